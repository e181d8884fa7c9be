"""The daemons' and components' metrics, on the one registry (`corral.common.metrics`)
that the daemon skeleton serves at `/metrics`. The store's own are in `corral.api.metrics`.
Names are prefixed `corral_`; see README.md for the list.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from corral.common.metrics import FAST, REGISTRY, SLOW

# ------------------------------------------------------------ the skeleton
DAEMON_INFO = Gauge(
    "corral_daemon_info", "Always 1: which daemon this is", ["daemon", "node"], registry=REGISTRY
)
ETCD_UP = Gauge(
    "corral_etcd_up", "1 if the last etcd health probe succeeded, else 0", registry=REGISTRY
)
COMPONENT_HEALTHY = Gauge(
    "corral_component_healthy",
    "1 if the supervised component is running and not crash-looping",
    ["component"],
    registry=REGISTRY,
)
COMPONENT_RESTARTS = Counter(
    "corral_component_restarts",
    "Times a supervised component failed and was restarted",
    ["component"],
    registry=REGISTRY,
)

# ------------------------------------------------------------ overlay
RECONCILE_SECONDS = Histogram(
    "corral_overlay_reconcile_duration_seconds",
    "Overlay reconcile passes: full (device, every peer, fast path) or changes (changed leases)",
    ["kind"],
    buckets=SLOW,
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "corral_overlay_reconcile_errors",
    "Overlay reconcile passes that failed (retried with a full pass)",
    registry=REGISTRY,
)
LEASE_RENEWALS = Counter(
    "corral_subnet_lease_renewals",
    "Subnet lease renewals: ok, failed (etcd error, retried) or lost (re-acquired)",
    ["result"],
    registry=REGISTRY,
)

# ------------------------------------------------------------ CNI
CNI_REQUESTS = Counter(
    "corral_cni_requests",
    "CNI requests served by the node daemon, by verb and result code (0 = success)",
    ["verb", "code"],
    registry=REGISTRY,
)
CNI_REQUEST_SECONDS = Histogram(
    "corral_cni_request_duration_seconds",
    "Latency of CNI requests in the node daemon, by verb",
    ["verb"],
    buckets=FAST,
    registry=REGISTRY,
)
# IPAM pool usage is read at scrape time (the CNI server's collector), per pool label.
IPAM_ALLOCATED_NAME = "corral_ipam_pool_allocated_addresses"
IPAM_SIZE_NAME = "corral_ipam_pool_size_addresses"

# ------------------------------------------------------------ pods
POD_START_SECONDS = Histogram(
    "corral_pod_start_duration_seconds",
    "From the runtime seeing a pod to its Ready status written",
    buckets=SLOW,
    registry=REGISTRY,
)
POD_START_STAGE_SECONDS = Histogram(
    "corral_pod_start_stage_duration_seconds",
    "Time spent in each pod start stage (sandbox, cgroups, netns, cni-add, launch, ...)",
    ["stage"],
    buckets=(*FAST, 10.0),
    registry=REGISTRY,
)


# ------------------------------------------------------------ service proxy
PROXY_SYNC_SECONDS = Histogram(
    "corral_proxy_sync_duration_seconds",
    "Service proxy syncs: full (every service, hooks, stale chains) or partial (changed ones)",
    ["kind"],
    buckets=FAST,
    registry=REGISTRY,
)
PROXY_SYNC_ERRORS = Counter(
    "corral_proxy_sync_errors",
    "Service proxy syncs that failed (retried as a full sync)",
    registry=REGISTRY,
)
PROXY_RULES_WRITTEN = Counter(
    "corral_proxy_rules_written",
    "Rules written to the kernel by the service proxy, by sync kind",
    ["kind"],
    registry=REGISTRY,
)
PROXY_LAST_SYNC = Gauge(
    "corral_proxy_last_successful_sync_timestamp_seconds",
    "When the service proxy last programmed the kernel successfully (unix time)",
    registry=REGISTRY,
)
PROXY_PENDING = Gauge(
    "corral_proxy_pending_changes",
    "Services whose change the service proxy has seen but not programmed yet",
    registry=REGISTRY,
)
PROXY_PROGRAMMING_SECONDS = Histogram(
    "corral_proxy_programming_latency_seconds",
    "From the proxy receiving a Service/EndpointSlice change (watch event) to its rules live",
    buckets=FAST,
    registry=REGISTRY,
)
PROXY_REPAIRS = Counter(
    "corral_proxy_repairs",
    "Full syncs the canary chain asked for (someone flushed or deleted corral's rules)",
    registry=REGISTRY,
)
