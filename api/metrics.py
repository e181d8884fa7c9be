"""The store's metrics (etcd requests and watches), on the one registry."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from corral.common.metrics import FAST, REGISTRY

ETCD_REQUEST_SECONDS = Histogram(
    "corral_etcd_request_duration_seconds",
    "Latency of etcd requests made by the store, by store operation",
    ["op"],
    buckets=FAST,
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
