"""The one Prometheus registry every corral metric lives on, and its scrape-time helpers.

The daemon skeleton serves REGISTRY at `/metrics`. Metrics are module-level and
cheap, so code used outside a daemon (the CLI, tests, benchmarks) updates them
harmlessly: nobody serves the registry. Each layer declares its own metrics on
it (the store's in `corral.api.metrics`, the daemons' in `corral.daemon.metrics`);
names are prefixed `corral_`, and README.md lists them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# No `_created` series: they double the output and nothing here reads them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

# Histogram buckets (seconds): requests and syncs, and slower passes.
FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
