"""Running the control plane: the controllers in one process, daemons until SIGTERM."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.api.store import Store
from corral.control.endpoints import EndpointsController
from corral.control.nodelifecycle import NodeLifecycleController
from corral.control.replication import ReplicationManager
from corral.control.serviceips import ServiceIPController
from corral.control.supervisor import Supervisor
from corral.daemon.core import Daemon, Restartable

log = logging.getLogger(__name__)


@dataclass
class ControllerOptions:
    node_monitor_grace: float = 40.0
    pod_eviction_timeout: float = 60.0
    seed: int | None = None


CONTROLLERS: dict[str, Callable[[Store, ControllerOptions], Any]] = {
    "replication": lambda s, o: ReplicationManager(s),
    "endpoints": lambda s, o: EndpointsController(s),
    "serviceips": lambda s, o: ServiceIPController(s, seed=o.seed),
    "nodelifecycle": lambda s, o: NodeLifecycleController(
        s, monitor_grace=o.node_monitor_grace, eviction_timeout=o.pod_eviction_timeout
    ),
}


async def run_controllers(
    store: Store, options: ControllerOptions, names: list[str] | None = None
) -> None:
    """Run the named controllers (all by default) until cancelled."""
    async with Supervisor() as sv:
        for name in names or list(CONTROLLERS):
            sv.start(CONTROLLERS[name](store, options).run(), name)
        await sv.wait()


def node_name() -> str:
    """The node a control-plane daemon runs on, for its logs (CORRAL_NODE, else the hostname)."""
    return os.environ.get("CORRAL_NODE") or os.uname().nodename


async def serve(
    urls: list[str],
    name: str,
    components: dict[str, Callable[[Store], Any]],
    http_addr: tuple[str, int] | None = None,
    debug_socket: str | None = None,
) -> None:
    """Run a control-plane daemon on the skeleton until SIGTERM or SIGINT.

    Each entry of `components` makes a fresh object with `run()` for every
    (re)start, so a failed controller restarts alone, from a clean re-list,
    while the others go on.
    """
    store = Store(urls)
    d = Daemon(
        name,
        node_name(),
        store,
        http_addr=http_addr,
        debug_socket=debug_socket,
        configure_logging=True,
    )
    for cname, make in components.items():
        d.add(cname, Restartable(lambda make=make: make(store)))
    await d.run()
