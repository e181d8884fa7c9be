"""The scheduler: binds each unscheduled pod to a node by compare-and-swap.

Pods waiting for a node go through a work queue. A pod that fits nowhere
gets `PodScheduled=False, reason Unschedulable` with a message naming why per
node, and is retried with exponential backoff, and at once when a node or a
pod changes in a way that could make room.
"""

from __future__ import annotations

import asyncio
import logging
import random

from corral.api.informer import Informer, InformerFactory, started
from corral.api.objects import Node, Pod
from corral.api.store import Conflict, NotFound, Store
from corral.common.supervisor import Supervisor
from corral.control.conditions import set_pod_condition
from corral.control.placement import NodeInfo, choose_node
from corral.control.workqueue import WorkQueue, run_worker

log = logging.getLogger(__name__)

SCHEDULER_NAME = "default-scheduler"
_OUR_NAMES = (None, "", SCHEDULER_NAME, "corral-scheduler")


def wants_scheduling(pod: Pod) -> bool:
    return (
        not pod.spec.node_name
        and pod.metadata.deletion_timestamp is None
        and pod.status.phase not in ("Succeeded", "Failed")
        and pod.spec.scheduler_name in _OUR_NAMES
    )


def holds_resources(pod: Pod) -> bool:
    return bool(pod.spec.node_name) and pod.status.phase not in ("Succeeded", "Failed")


def _node_shape(node: Node) -> tuple:
    """What of a node matters for placement (heartbeats alone do not requeue pods)."""
    return (
        node.ready,
        node.spec.unschedulable,
        node.spec.model_dump_json(),
        sorted(node.metadata.labels.items()),
        sorted(map(str, node.status.allocatable.items())),
        sorted(map(str, node.status.capacity.items())),
    )


class Scheduler:
    def __init__(
        self,
        store: Store,
        seed: int | None = None,
        initial_backoff: float = 1.0,
        max_backoff: float = 10.0,
        informers: InformerFactory | None = None,
    ) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.rng = random.Random(seed)
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.nodes: Informer[Node] = self.informers.informer(Node)
        self.pods: Informer[Pod] = self.informers.informer(Pod)
        self.queue = WorkQueue()
        self._assumed: dict[str, str] = {}  # pod key -> node, bound but not yet watched
        self._attempts: dict[str, int] = {}  # pod key -> failed attempts (unschedulable)
        self._stale: set[str] = set()  # pod keys whose cached copy lost a CAS
        self._binding: set[asyncio.Task] = set()
        self.nodes.on_change(self._node_changed)
        self.pods.on_change(self._pod_changed)

    # ---------------------------------------------------------------- events

    def _retry_unschedulable(self) -> None:
        for key in list(self._attempts):
            self.queue.add(key)

    def _node_changed(self, old: Node | None, new: Node | None) -> None:
        if new is not None and (old is None or _node_shape(old) != _node_shape(new)):
            self._retry_unschedulable()

    def _pod_changed(self, old: Pod | None, new: Pod | None) -> None:
        if new is None:
            key = old.key_name if old is not None else ""
            self._assumed.pop(key, None)
            self._attempts.pop(key, None)
            self._stale.discard(key)
            if old is not None and holds_resources(old):
                self._retry_unschedulable()
            return
        key = new.key_name
        if new.spec.node_name:
            self._assumed.pop(key, None)
            self._attempts.pop(key, None)
            if old is not None and holds_resources(old) and not holds_resources(new):
                self._retry_unschedulable()
            return
        if not wants_scheduling(new):
            self._attempts.pop(key, None)
            return
        # A pod already waiting out its backoff is only retried early when its
        # spec changed, not when its own status write comes back through the watch.
        if key in self._attempts and old is not None and old.spec == new.spec:
            return
        self.queue.add(key)

    # ---------------------------------------------------------------- scheduling

    def node_infos(self) -> list[NodeInfo]:
        infos = {n.name: NodeInfo(n) for n in self.nodes.values()}
        for key, pod in self.pods.cache.items():
            node = pod.spec.node_name or self._assumed.get(key)
            if node in infos and (pod.spec.node_name is None or holds_resources(pod)):
                infos[node].add_pod(pod)
        return [infos[name] for name in sorted(infos)]

    async def schedule(self, key: str) -> float | None:
        ns, _, name = key.partition("/")
        cached = self.pods.cache.get(key)
        if cached is None or key in self._stale:
            self._stale.discard(key)
            pod = await self.store.get(Pod, name, ns)
        else:
            pod = cached.model_copy(deep=True)  # the cache is shared: never change it
        if pod is None or not wants_scheduling(pod) or key in self._assumed:
            self._attempts.pop(key, None)
            return None
        decision = choose_node(pod, self.node_infos(), self.rng)
        if decision.node is None:
            return await self._unschedulable(pod, decision.message)
        # Bind in the background, as kube-scheduler does: the pod is assumed on its
        # node at once, so the next pod is placed without waiting for etcd.
        self._assumed[key] = decision.node
        self._attempts.pop(key, None)
        task = asyncio.create_task(self._bind(pod, decision.node))
        self._binding.add(task)
        task.add_done_callback(self._binding.discard)
        return None

    async def _bind(self, pod: Pod, node: str) -> None:
        key = pod.key_name
        pod.spec.node_name = node
        set_pod_condition(pod.status, "PodScheduled", "True")
        try:
            await self.store.update(pod)
        except NotFound:
            self._assumed.pop(key, None)
            return
        except Conflict:
            self._assumed.pop(key, None)
            self._stale.add(key)  # changed under us: look again with a fresh read
            self.queue.add(key)
            return
        except Exception as e:  # etcd trouble: forget the assumption, retry later
            log.warning("binding %s to %s failed: %s: %s", key, node, type(e).__name__, e)
            self._assumed.pop(key, None)
            self._stale.add(key)
            self.queue.add_after(key, 1.0)
            return
        log.info("bound %s to %s", key, node)

    async def _unschedulable(self, pod: Pod, message: str) -> float:
        key = pod.key_name
        n = self._attempts[key] = self._attempts.get(key, 0) + 1
        if set_pod_condition(pod.status, "PodScheduled", "False", "Unschedulable", message):
            log.info("%s is unschedulable: %s", key, message)
            try:
                await self.store.update(pod)
            except (Conflict, NotFound):
                self._stale.add(key)  # the next attempt re-reads it
        return min(self.initial_backoff * 2 ** (n - 1), self.max_backoff)

    async def run(self) -> None:
        try:
            async with started(self.informers, stop=self._own_informers), Supervisor() as sv:
                await self.nodes.wait_synced()
                await self.pods.wait_synced()
                sv.start(run_worker(self.queue, self.schedule, "scheduler"), "scheduler-worker")
                await sv.wait()
        finally:
            for t in list(self._binding):
                t.cancel()
