"""`corral node`: the per-node agent composing overlay, CNI server and pod runtime.

One asyncio loop holds one Store. Components start in order (the overlay must
lease a subnet before CNI can hand out addresses, and CNI must serve before
pods are started); their `run()` loops then go on side by side. A component
whose loop fails is restarted with backoff rather than taking the node down:
pods keep working while one part recovers. Stopping never tears down kernel
state, so a restarted agent converges without disturbing traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
from typing import Any, Protocol

from corral.api.objects import Node, NodeAddress, NodeCondition, NodeStatus
from corral.api.store import AlreadyExists, NotFound, Unavailable, now_iso
from corral.node.context import NodeContext

log = logging.getLogger("corral.node")

HEARTBEAT_SECONDS = 10.0

# name -> (module, class); started in this order.
COMPONENTS: dict[str, tuple[str, str]] = {
    "overlay": ("corral.overlay.agent", "OverlayAgent"),
    "cni": ("corral.cni.server", "CNIServer"),
    "pods": ("corral.runtime.pods", "PodRuntime"),
}


class NodeSetupError(RuntimeError):
    """The node cannot start as configured (the message says what to change)."""


class Component(Protocol):
    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...


def load_component(name: str, ctx: NodeContext) -> Component:
    module, cls = COMPONENTS[name]
    return getattr(importlib.import_module(module), cls)(ctx)


def underlay_address(iface: str | None = None) -> tuple[str, str]:
    """(interface, IPv4 address) of `iface`, or of the default route's interface."""
    from corral.overlay.vxlan import Kernel, KernelError  # the overlay's one lookup

    kernel = Kernel()
    try:
        found = kernel.find_underlay(iface)
    except KernelError as e:
        raise NodeSetupError(str(e)) from None
    finally:
        kernel.close()
    return found.iface, found.ip


def node_capacity() -> dict[str, Any]:
    """What this machine offers pods: cpu cores, memory, and the kubelet's 110 pods."""
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{mem_kib}Ki", "pods": "110"}


class NodeAgent:
    def __init__(self, ctx: NodeContext, components: list[str] | None = None) -> None:
        self.ctx = ctx
        self.names = components if components is not None else list(COMPONENTS)
        self.components: dict[str, Component] = {}
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def connect(self) -> None:
        """Wait for etcd (it may start after us); never give up, but say why we wait."""
        delay = 0.2
        while True:
            try:
                await self.ctx.store.connect()
                return
            except Unavailable as e:
                log.warning("waiting for etcd: %s (retrying in %.1fs)", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _status(self, old: NodeStatus | None) -> NodeStatus:
        status = old.model_copy(deep=True) if old else NodeStatus()
        if self.ctx.underlay_ip:
            status.addresses = [
                NodeAddress(type="InternalIP", address=self.ctx.underlay_ip),
                NodeAddress(type="Hostname", address=self.ctx.node_name),
            ]
        cap = node_capacity()
        status.capacity = {**cap, **status.capacity} if status.capacity else cap
        status.allocatable = status.allocatable or dict(status.capacity)
        now = now_iso()
        ready = status.condition("Ready")
        if ready is None or ready.status != "True":
            status.conditions = [c for c in status.conditions if c.type != "Ready"]
            status.conditions.append(
                NodeCondition(
                    type="Ready",
                    status="True",
                    reason="AgentReady",
                    message="corral node agent is posting ready status",
                    last_heartbeat_time=now,
                    last_transition_time=now,
                )
            )
        else:
            ready.last_heartbeat_time = now
        return status

    async def heartbeat(self) -> None:
        """Create or refresh this node's Node object: addresses, capacity, Ready."""
        name = self.ctx.node_name

        def change(n: Node) -> Node:
            n.status = self._status(n.status)
            return n

        try:
            await self.ctx.store.modify(Node, name, None, change)
        except NotFound:
            node = Node(
                metadata={"name": name, "labels": {"kubernetes.io/hostname": name}},
                status=self._status(None),
            )
            with contextlib.suppress(AlreadyExists):
                await self.ctx.store.create(node)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except Exception as e:  # keep beating through etcd hiccups
                log.warning("node heartbeat failed: %s", e)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _supervise(self, name: str, comp: Component) -> None:
        delay = 1.0
        while True:
            try:
                await comp.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("component %s failed; restarting it in %.0fs", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def run(self) -> None:
        if self.ctx.underlay_ip is None:
            loop = asyncio.get_running_loop()
            iface, ip = await loop.run_in_executor(None, underlay_address, self.ctx.underlay_iface)
            self.ctx.underlay_iface, self.ctx.underlay_ip = iface, ip
        for d in (self.ctx.paths.run_dir, self.ctx.paths.state_dir):
            os.makedirs(d, exist_ok=True)
        await self.connect()
        await self.heartbeat()
        log.info(
            "node %s: underlay %s on %s",
            self.ctx.node_name,
            self.ctx.underlay_ip,
            self.ctx.underlay_iface,
        )
        tasks: list[asyncio.Task] = []
        try:
            for name in self.names:
                comp = load_component(name, self.ctx)
                await comp.start()
                self.components[name] = comp
                log.info("component %s started", name)
                tasks.append(asyncio.create_task(self._supervise(name, comp), name=name))
            tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for name in reversed(list(self.components)):
                try:
                    await self.components[name].stop()
                except Exception:
                    log.exception("component %s failed to stop cleanly", name)
            await self.ctx.informers.stop()
            await self.ctx.store.close()


async def serve(ctx: NodeContext, components: list[str] | None = None) -> None:
    agent = NodeAgent(ctx, components)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()
