"""`corral node`: the per-node agent composing overlay, CNI server and pod runtime.

One asyncio loop holds one Store. Components start in order (the overlay must
lease a subnet before CNI can hand out addresses, and CNI must serve before
pods are started); their `run()` loops then go on side by side, supervised by
the daemon skeleton (`corral.daemon`). A component whose loop fails is
restarted with backoff rather than taking the node down: pods keep working
while one part recovers, and the node reports NotReady naming it meanwhile.
Stopping never tears down kernel state, so a restarted agent converges
without disturbing traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from typing import Any, Protocol

from corral.api.objects import Node, NodeAddress, NodeCondition, NodeStatus
from corral.api.store import AlreadyExists, NotFound, now_iso
from corral.common.labels import HOSTNAME_LABEL
from corral.daemon.core import Daemon, Informers, Timings
from corral.daemon.nodecontext import NodeContext
from corral.daemon.options import PORTS
from corral.node import netlink, underlay

log = logging.getLogger("corral.node")

HEARTBEAT_SECONDS = 10.0
HEARTBEAT_CHECK_SECONDS = 1.0  # how often a change of health is looked for

# name -> (module, class); started in this order.
COMPONENTS: dict[str, tuple[str, str]] = {
    "overlay": ("corral.overlay.agent", "OverlayAgent"),
    # before CNI: its ADD hook puts a new pod's policy in place before ADD answers
    "netpolicy": ("corral.netpolicy.component", "NetworkPolicyAgent"),
    "cni": ("corral.cni.server", "CNIServer"),
    "pods": ("corral.runtime.pods", "PodRuntime"),
    "api": ("corral.runtime.nodeapi", "NodeAPI"),  # logs and exec for the API server
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


def underlay_address(iface: str | None = None, ns: str | None = None) -> tuple[str, str]:
    """(interface, IPv4 address) of `iface`, or of the default route's interface, in
    namespace `ns` (None: this one)."""
    try:
        with netlink.iproute(ns) as ipr:
            found = underlay.find(ipr, iface)
    except underlay.UnderlayError as e:
        raise NodeSetupError(str(e)) from None
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
    """The node daemon: the skeleton (`corral.daemon`) plus the node's components.

    The Ready condition follows the daemon's health: a crash-looping component
    posts Ready=False (reason ComponentFailing, the message naming it and its
    last error) and Ready=True again once it has recovered.
    """

    def __init__(
        self,
        ctx: NodeContext,
        components: list[str] | None = None,
        *,
        http_addr: tuple[str, int] | None = ("", PORTS["node"]),
        debug_socket: str | None = "",
        timings: Timings | None = None,
        handle_signals: bool = True,
        configure_logging: bool = False,
    ) -> None:
        """`http_addr` with an empty host serves on the underlay address; `debug_socket`
        "" means the node's own (`NodePaths.debug_socket`), None none."""
        self.ctx = ctx
        self.names = components if components is not None else list(COMPONENTS)
        self.components: dict[str, Component] = {}
        self.daemon = Daemon(
            "node",
            ctx.node_name,
            ctx.store,
            http_addr=http_addr,
            debug_socket=ctx.paths.debug_socket if debug_socket == "" else debug_socket,
            timings=timings,
            handle_signals=handle_signals,
            configure_logging=configure_logging,
        )
        self._posted: tuple[str, str, str] | None = None

    def request_stop(self) -> None:
        self.daemon.request_stop()

    def condition(self) -> tuple[str, str, str]:
        """(status, reason, message) of the Ready condition this node should post."""
        failing = self.daemon.failing_components()
        if failing:
            msg = "; ".join(f"{c.name.removeprefix('component/')}: {c.message}" for c in failing)
            return "False", "ComponentFailing", msg
        pending = [n for n in self.names if not self.daemon.states[n].started]
        if pending:
            return "False", "Starting", f"starting {', '.join(pending)}"
        return "True", "AgentReady", "corral node agent is posting ready status"

    def _status(self, old: NodeStatus | None) -> NodeStatus:
        status = old.model_copy(deep=True) if old else NodeStatus()
        if self.ctx.underlay_ip:
            status.addresses = [
                NodeAddress(type="InternalIP", address=self.ctx.underlay_ip),
                NodeAddress(type="Hostname", address=self.ctx.node_name),
            ]
        o = self.ctx.options
        if "api" in self.names and o.tls_cert_file and o.tls_private_key_file:
            status.daemon_endpoints = {"kubeletEndpoint": {"Port": o.node_api_port}}
        cap = node_capacity()
        status.capacity = {**cap, **status.capacity} if status.capacity else cap
        status.allocatable = status.allocatable or dict(status.capacity)
        now = now_iso()
        want, reason, message = self.condition()
        ready = status.condition("Ready")
        if ready is None or (ready.status, ready.reason, ready.message) != (want, reason, message):
            changed = ready is None or ready.status != want
            status.conditions = [c for c in status.conditions if c.type != "Ready"]
            status.conditions.append(
                NodeCondition(
                    type="Ready",
                    status=want,
                    reason=reason,
                    message=message,
                    last_heartbeat_time=now,
                    last_transition_time=now if changed else ready.last_transition_time,
                )
            )
            if changed:
                log.info("node %s: Ready=%s (%s: %s)", self.ctx.node_name, want, reason, message)
        else:
            ready.last_heartbeat_time = now
        return status

    async def heartbeat(self) -> None:
        """Create or refresh this node's Node object: addresses, capacity, Ready."""
        name = self.ctx.node_name
        self._posted = self.condition()

        def change(n: Node) -> Node:
            n.status = self._status(n.status)
            return n

        try:
            await self.ctx.store.modify(Node, name, None, change)
        except NotFound:
            node = Node(
                metadata={"name": name, "labels": {HOSTNAME_LABEL: name}},
                status=self._status(None),
            )
            with contextlib.suppress(AlreadyExists):
                await self.ctx.store.create(node)

    async def _heartbeat_loop(self) -> None:
        """Every HEARTBEAT_SECONDS, and at once when the Ready condition should change."""
        loop = asyncio.get_running_loop()
        due = 0.0
        while True:
            if loop.time() >= due or self.condition() != self._posted:
                try:
                    await self.heartbeat()
                    due = loop.time() + HEARTBEAT_SECONDS
                except Exception as e:  # keep beating through etcd hiccups
                    log.warning("node heartbeat failed: %s", e)
                    due = loop.time() + 1.0
            await asyncio.sleep(HEARTBEAT_CHECK_SECONDS)

    async def _prepare(self) -> None:
        """Before anything else: find the underlay address (the HTTP server binds to it)."""
        if self.ctx.underlay_ip is None:
            loop = asyncio.get_running_loop()
            iface, ip = await loop.run_in_executor(
                None, underlay_address, self.ctx.underlay_iface, self.ctx.options.netns
            )
            self.ctx.underlay_iface, self.ctx.underlay_ip = iface, ip
        for d in (self.ctx.paths.run_dir, self.ctx.paths.state_dir):
            os.makedirs(d, exist_ok=True)
        addr = self.daemon.http_addr
        if addr is not None and not addr[0]:
            self.daemon.http_addr = (self.ctx.underlay_ip, addr[1])

    async def _connected(self) -> None:
        await self.heartbeat()
        log.info(
            "node %s: underlay %s on %s",
            self.ctx.node_name,
            self.ctx.underlay_ip,
            self.ctx.underlay_iface,
        )

    async def run(self) -> None:
        await self._prepare()
        self.daemon.add("informers", Informers(self.ctx.informers))
        for name in self.names:
            comp = load_component(name, self.ctx)
            self.components[name] = comp
            self.daemon.add(name, comp)
        self.daemon.add("heartbeat", _Loop(self._heartbeat_loop, self._heartbeat_state))
        self.daemon.on_connected.append(self._connected)
        await self.daemon.run()

    def _heartbeat_state(self) -> dict[str, Any]:
        status, reason, message = self._posted or ("", "", "")
        return {"ready": status, "reason": reason, "message": message}


class _Loop:
    """A component that is just a coroutine function (and, optionally, its debug state)."""

    def __init__(self, fn: Any, state: Any = None) -> None:
        self._fn, self._state = fn, state

    async def run(self) -> None:
        await self._fn()

    def debug_state(self) -> dict[str, Any]:
        return self._state() if self._state else {}


async def serve(
    ctx: NodeContext,
    components: list[str] | None = None,
    http_addr: tuple[str, int] | None = ("", PORTS["node"]),
    debug_socket: str | None = "",
) -> None:
    agent = NodeAgent(
        ctx, components, http_addr=http_addr, debug_socket=debug_socket, configure_logging=True
    )
    await agent.run()
