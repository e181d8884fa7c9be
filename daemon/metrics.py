"""Every corral metric, on one registry the daemon skeleton serves at `/metrics`.

The metrics are module-level and cheap, so code used outside a daemon (the
CLI, tests, benchmarks) updates them harmlessly: nobody serves the registry.
Names are prefixed `corral_`; see README.md for the list.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# No `_created` series: they double the output and nothing here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

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

# ------------------------------------------------------------ the store
ETCD_REQUEST_SECONDS = Histogram(
    "corral_etcd_request_duration_seconds",
    "Latency of etcd requests made by the store, by store operation",
    ["op"],
    buckets=_FAST,
    registry=REGISTRY,
)
ETCD_REQUEST_ERRORS = Counter(
    "corral_etcd_request_errors",
    "etcd requests that failed, by store operation and error type",
    ["op", "error"],
    registry=REGISTRY,
)
WATCH_RESTARTS = Counter(
    "corral_etcd_watch_restarts",
    "etcd watches restarted: after a broken stream (reconnect) or a compacted revision (relist)",
    ["reason"],
    registry=REGISTRY,
)

# ------------------------------------------------------------ overlay
RECONCILE_SECONDS = Histogram(
    "corral_overlay_reconcile_duration_seconds",
    "Overlay reconcile passes: full (device, every peer, fast path) or changes (changed leases)",
    ["kind"],
    buckets=_SLOW,
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
    buckets=_FAST,
    registry=REGISTRY,
)
# IPAM pool usage is read at scrape time (the CNI server's collector), per pool label.
IPAM_ALLOCATED_NAME = "corral_ipam_pool_allocated_addresses"
IPAM_SIZE_NAME = "corral_ipam_pool_size_addresses"

# ------------------------------------------------------------ pods
POD_START_SECONDS = Histogram(
    "corral_pod_start_duration_seconds",
    "From the runtime seeing a pod to its Ready status written",
    buckets=_SLOW,
    registry=REGISTRY,
)
POD_START_STAGE_SECONDS = Histogram(
    "corral_pod_start_stage_duration_seconds",
    "Time spent in each pod start stage (sandbox, cgroups, netns, cni-add, launch, ...)",
    ["stage"],
    buckets=(*_FAST, 10.0),
    registry=REGISTRY,
)


class CallbackCollector(Collector):
    """Metrics computed at scrape time by `fn` (e.g. BPF map counters)."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self.fn = fn

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self.fn())
        except Exception:  # a scrape never fails because one source did
            return []

    def describe(self) -> Iterable[Metric]:
        return []


def counter_family(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in sorted(values.items()):
        fam.add_metric([k], v)
    return fam


def register_collector(fn: Callable[[], Iterable[Metric]]) -> Callable[[], None]:
    """Register a scrape-time collector; returns the function that unregisters it."""
    c = CallbackCollector(fn)
    REGISTRY.register(c)

    def unregister() -> None:
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(c)

    return unregister


# ------------------------------------------------------------ service proxy
PROXY_SYNC_SECONDS = Histogram(
    "corral_proxy_sync_duration_seconds",
    "Service proxy syncs: full (every service, hooks, stale chains) or partial (changed ones)",
    ["kind"],
    buckets=_FAST,
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
    buckets=_FAST,
    registry=REGISTRY,
)
PROXY_REPAIRS = Counter(
    "corral_proxy_repairs",
    "Full syncs the canary chain asked for (someone flushed or deleted corral's rules)",
    registry=REGISTRY,
)
