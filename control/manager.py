"""Running the control plane: the controllers in one process, daemons until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from corral.api.informer import InformerFactory, started
from corral.api.store import Store
from corral.control.endpoints import EndpointsController
from corral.control.nodelifecycle import NodeLifecycleController
from corral.control.replication import ReplicationManager
from corral.control.serviceips import ServiceIPController
from corral.control.supervisor import Supervisor

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


async def serve(
    store: Store, name: str, body: Callable[[Store], Coroutine[Any, Any, None]]
) -> None:
    """Connect to etcd and run `body(store)` until SIGTERM or SIGINT.

    An unreachable etcd at start raises Unavailable (the user's mistake to
    report); a failure later restarts `body` after a pause, since the informers
    re-list and converge.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await store.connect()
        log.info("%s started (etcd %s)", name, store.url)
        backoff = 1.0
        while True:
            started = loop.time()
            try:
                await body(store)
                return
            except Exception as e:  # a daemon outlives etcd outages
                if loop.time() - started > 60:
                    backoff = 1.0
                log.error(
                    "%s failed (%s: %s); restarting in %.0fs",
                    name,
                    type(e).__name__,
                    e,
                    backoff,
                    exc_info=True,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
    except asyncio.CancelledError:
        log.info("%s stopping", name)
    finally:
        with contextlib.suppress(Exception):
            await store.close()
