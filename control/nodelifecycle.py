"""Nodes that stop reporting, and the pods no node will ever finish.

- A node whose Ready heartbeat (`lastHeartbeatTime`) is older than
  `monitor_grace` is marked `Ready=Unknown` ("Kubelet stopped posting node
  status."), as kube-controller-manager does.
- Pods on a node that has not been Ready for `eviction_timeout` are deleted,
  so their controllers recreate them elsewhere (the node runtime, if it ever
  comes back, tears down pods it no longer finds).
- Pods bound to a node that does not exist, and terminating pods that no node
  will stop (never scheduled), are deleted at once.
"""

from __future__ import annotations

import contextlib
import logging
import time

from corral.api.informer import Informer, InformerFactory, started
from corral.api.objects import Node, NodeCondition, Pod
from corral.api.store import Conflict, NotFound, Store, now_iso
from corral.control.podlifecycle import parse_time, terminating
from corral.daemon.runner import BoundedFrequencyRunner

log = logging.getLogger(__name__)


class NodeLifecycleController:
    def __init__(
        self,
        store: Store,
        monitor_grace: float = 40.0,
        eviction_timeout: float = 60.0,
        period: float = 1.0,
        informers: InformerFactory | None = None,
    ) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.monitor_grace = monitor_grace
        self.eviction_timeout = eviction_timeout
        self.period = period
        self.nodes: Informer[Node] = self.informers.informer(Node)
        self.pods: Informer[Pod] = self.informers.informer(Pod)
        # A sweep when a change asks for one (a pod on a missing node, a node gone)
        # and every `period` regardless, for the heartbeat and eviction clocks.
        self.runner = BoundedFrequencyRunner(
            "node lifecycle", self._sweep, 0.0, period, run_at_start=True
        )
        self.nodes.on_change(self._changed)
        self.pods.on_change(self._changed)

    def _kick(self) -> None:
        self.runner.run_soon()

    def _changed(self, old: object, new: object) -> None:
        if isinstance(new, Pod):
            node = new.spec.node_name
            if (terminating(new) and not node) or (node and node not in self.nodes.cache):
                self._kick()
        elif new is None and isinstance(old, Node):
            self._kick()

    def _stale(self, node: Node, now: float) -> bool:
        ready = node.status.condition("Ready")
        if ready is None or ready.status != "True":
            return False
        beat = parse_time(ready.last_heartbeat_time)
        return beat is not None and now - beat > self.monitor_grace

    def _evictable(self, node: Node, now: float) -> bool:
        ready = node.status.condition("Ready")
        if ready is None or ready.status == "True":
            return False
        since = parse_time(ready.last_transition_time)
        return since is not None and now - since > self.eviction_timeout

    async def _mark_unknown(self, node: Node) -> None:
        def change(n: Node) -> Node | None:
            if not self._stale(n, time.time()):
                return None
            ready = n.status.condition("Ready")
            n.status.conditions = [c for c in n.status.conditions if c.type != "Ready"]
            n.status.conditions.append(
                NodeCondition(
                    type="Ready",
                    status="Unknown",
                    reason="NodeStatusUnknown",
                    message="Kubelet stopped posting node status.",
                    last_heartbeat_time=ready.last_heartbeat_time if ready else None,
                    last_transition_time=now_iso(),
                )
            )
            return n

        log.warning("node %s stopped posting status; marking it Ready=Unknown", node.name)
        with contextlib.suppress(NotFound, Conflict):
            await self.store.modify(Node, node.name, None, change)

    async def _delete(self, pod: Pod, why: str) -> None:
        log.info("deleting pod %s: %s", pod.key_name, why)
        await self.store.delete(Pod, pod.name, pod.namespace)

    async def sweep(self) -> None:
        now = time.time()
        for node in self.nodes.values():
            if self._stale(node, now):
                await self._mark_unknown(node)
        evict = {n.name for n in self.nodes.values() if self._evictable(n, now)}
        for pod in self.pods.values():
            node = pod.spec.node_name
            if not node:
                if terminating(pod):
                    await self._delete(pod, "terminating and never scheduled")
            elif node in evict:
                await self._delete(
                    pod, f"node {node} has not been ready for {self.eviction_timeout:g}s"
                )
            elif node not in self.nodes.cache and await self.store.get(Node, node) is None:
                await self._delete(pod, f"its node {node} no longer exists")

    async def _sweep(self, full: bool) -> None:
        try:
            await self.sweep()
        except Exception as e:  # etcd hiccup: the next sweep retries
            log.warning("node lifecycle sweep failed: %s: %s", type(e).__name__, e)

    async def run(self) -> None:
        async with started(self.informers, stop=self._own_informers):
            await self.nodes.wait_synced()
            await self.pods.wait_synced()
            await self.runner.run()
