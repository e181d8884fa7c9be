"""Running the control plane: the controllers in one process, daemons until SIGTERM."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.api.informer import InformerFactory, started
from corral.api.store import Store
from corral.common.supervisor import Supervisor
from corral.control.endpoints import EndpointsController
from corral.control.garbagecollector import GarbageCollector
from corral.control.lbips import LoadBalancerIPController
from corral.control.namespaces import NamespaceController
from corral.control.nodelifecycle import NodeLifecycleController
from corral.control.replication import ReplicationManager
from corral.control.scheduler import Scheduler
from corral.control.serviceips import ServiceIPController
from corral.daemon.core import Daemon, Informers, Restartable
from corral.daemon.heap import HeapTuning

log = logging.getLogger(__name__)


@dataclass
class ControllerOptions:
    node_monitor_grace: float = 40.0
    pod_eviction_timeout: float = 60.0
    seed: int | None = None


# name -> factory(store, options, the process's informers)
CONTROLLERS: dict[str, Callable[[Store, ControllerOptions, InformerFactory], Any]] = {
    "replication": lambda s, o, i: ReplicationManager(s, informers=i),
    "endpoints": lambda s, o, i: EndpointsController(s, informers=i),
    "serviceips": lambda s, o, i: ServiceIPController(s, seed=o.seed, informers=i),
    "nodelifecycle": lambda s, o, i: NodeLifecycleController(
        s,
        monitor_grace=o.node_monitor_grace,
        eviction_timeout=o.pod_eviction_timeout,
        informers=i,
    ),
    "namespaces": lambda s, o, i: NamespaceController(s, informers=i),
    "garbagecollector": lambda s, o, i: GarbageCollector(s, informers=i),
    "lbips": lambda s, o, i: LoadBalancerIPController(s, informers=i),
}


async def run_controllers(
    store: Store, options: ControllerOptions, names: list[str] | None = None
) -> None:
    """Run the named controllers (all by default) until cancelled.

    They share one informer per kind: one watch on pods for all of them.
    """
    informers = InformerFactory(store)
    controllers = {
        name: CONTROLLERS[name](store, options, informers) for name in names or CONTROLLERS
    }
    async with started(informers), Supervisor() as sv:
        for name, c in controllers.items():
            sv.start(c.run(), name)
        await sv.wait()


def node_name() -> str:
    """The node a control-plane daemon runs on, for its logs (CORRAL_NODE, else the hostname)."""
    return os.environ.get("CORRAL_NODE") or os.uname().nodename


async def serve(
    store: Store,
    name: str,
    components: dict[str, Callable[[Store, InformerFactory], Any]],
    http_addr: tuple[str, int] | None = None,
    debug_socket: str | None = None,
) -> None:
    """Run a control-plane daemon on the skeleton until SIGTERM or SIGINT.

    Each entry of `components` makes a fresh object with `run()` for every
    (re)start, so a failed controller restarts alone while the others go on.
    They share the process's informers (one watch per kind), which a restarted
    controller re-reads from their caches.
    """
    informers = InformerFactory(store)
    d = Daemon(
        name,
        node_name(),
        store,
        http_addr=http_addr,
        debug_socket=debug_socket,
        configure_logging=True,
    )
    d.add("informers", Informers(informers))
    for cname, make in components.items():
        d.add(cname, Restartable(lambda make=make: make(store, informers)))
    d.add("heap", HeapTuning(informers))
    await d.run()


async def serve_scheduler(
    store: Store,
    *,
    seed: int | None = None,
    http_addr: tuple[str, int] | None,
    debug_socket: str | None,
) -> None:
    """`corral scheduler`: the scheduler until SIGTERM (`seed` breaks ties repeatably)."""

    def make(s: Store, informers: InformerFactory) -> Scheduler:
        return Scheduler(s, seed=seed, informers=informers)

    await serve(store, "scheduler", {"scheduler": make}, http_addr, debug_socket)


async def serve_controllers(
    store: Store,
    names: list[str],
    options: ControllerOptions,
    *,
    http_addr: tuple[str, int] | None,
    debug_socket: str | None,
) -> None:
    """`corral controllers`: the named controllers (keys of CONTROLLERS) until SIGTERM."""
    comps = {n: (lambda s, i, n=n: CONTROLLERS[n](s, options, i)) for n in names}
    await serve(store, "controllers", comps, http_addr, debug_socket)
