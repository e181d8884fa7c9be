"""The replication controller: N pods per ReplicationController, and per Deployment.

A Deployment (apps/v1) is kept like a ReplicationController whose selector is
its LabelSelector (no ReplicaSets), plus rollouts when its template changes
(control/rollout.py). Pods are named `<owner>-<5 chars>` and carry a
controller ownerReference; only pods owned that way are counted, so two
controllers never fight over a pod.

Each sync reads the owner's pods fresh from etcd, so pods created by the
previous sync are always seen and a slow watch never causes extra replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from typing import Any

from corral.api.informer import Informer, InformerFactory, started
from corral.api.objects import (
    Deployment,
    ObjectMeta,
    OwnerReference,
    Pod,
    ReplicationController,
    ReplicationControllerStatus,
)
from corral.api.selectors import matches, matches_label_selector
from corral.api.store import AlreadyExists, Conflict, NotFound, Store
from corral.common.supervisor import Supervisor
from corral.control.podlifecycle import delete_pod, finished, parse_time, terminating
from corral.control.rollout import (
    TEMPLATE_HASH_LABEL,
    Step,
    Strategy,
    rollout_step,
    strategy,
    template_hash,
)
from corral.control.workqueue import WorkQueue, run_worker

log = logging.getLogger(__name__)

Owner = ReplicationController | Deployment
OWNER_KINDS: dict[str, type[Owner]] = {  # type: ignore[dict-item]
    "ReplicationController": ReplicationController,
    "Deployment": Deployment,
}
_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # no vowels: no accidental words
BURST = 100  # pods created or deleted concurrently in one sync
MAX_CREATE = 500  # pods created per sync
POD_EVENT_BATCH = 0.05  # seconds pod changes are gathered before their owner syncs


def pod_name(owner: str) -> str:
    return f"{owner}-{''.join(secrets.choice(_SUFFIX_CHARS) for _ in range(5))}"


def controller_ref(pod: Pod) -> OwnerReference | None:
    return next((r for r in pod.metadata.owner_references if r.controller), None)


def owner_key(kind: str, namespace: str | None, name: str) -> str:
    return f"{kind}:{namespace}/{name}"


def pod_from_template(owner: Owner) -> Pod:
    tmpl = owner.spec.template
    labels = dict(tmpl.metadata.labels)
    if isinstance(owner, Deployment):
        labels[TEMPLATE_HASH_LABEL] = template_hash(tmpl)
    meta = ObjectMeta(
        name=pod_name(owner.name),
        namespace=owner.namespace,
        labels=labels,
        annotations=dict(tmpl.metadata.annotations),
        owner_references=[
            OwnerReference(
                api_version=owner.api_version,
                kind=owner.kind,
                name=owner.name,
                uid=owner.metadata.uid or "",
                controller=True,
                block_owner_deletion=True,
            )
        ],
    )
    return Pod(metadata=meta, spec=tmpl.spec.model_copy(deep=True))


def selects(owner: Owner, labels: dict[str, str]) -> bool:
    if isinstance(owner, Deployment):
        return matches_label_selector(owner.spec.selector, labels)
    return matches(owner.spec.selector, labels)


def deletion_rank(pod: Pod) -> tuple[Any, ...]:
    """Sort key: pods to delete first come first (kube's ActivePods order).

    Unscheduled before scheduled, Pending before Running, not ready before
    ready, more restarts first, newest first.
    """
    phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get(pod.status.phase, 0)
    restarts = sum(c.restart_count for c in pod.status.container_statuses)
    created = parse_time(pod.metadata.creation_timestamp) or 0.0
    return (bool(pod.spec.node_name), phase, pod.ready, -restarts, -created)


def available(pod: Pod, min_ready_seconds: int, now: float) -> bool:
    if not pod.ready:
        return False
    if min_ready_seconds <= 0:
        return True
    cond = pod.status.condition("Ready")
    since = parse_time(cond.last_transition_time if cond else None)
    return since is not None and since + min_ready_seconds <= now


class ReplicationManager:
    def __init__(self, store: Store, informers: InformerFactory | None = None) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.queue = WorkQueue()
        self.pods: Informer[Pod] = self.informers.informer(Pod)
        self.owners = {kind: self.informers.informer(cls) for kind, cls in OWNER_KINDS.items()}
        self.pods.on_change(self._pod_changed)
        for kind, inf in self.owners.items():
            inf.on_change(lambda old, new, kind=kind: self._owner_changed(kind, old, new))

    def _owner_changed(self, kind: str, old: Owner | None, new: Owner | None) -> None:
        obj = new or old
        if obj is not None:
            self.queue.add(owner_key(kind, obj.namespace, obj.name))

    def _pod_changed(self, old: Pod | None, new: Pod | None) -> None:
        for pod in (old, new):
            ref = controller_ref(pod) if pod is not None else None
            if ref is not None and ref.kind in OWNER_KINDS:
                # Coalesced: a burst of pod changes (30 pods bound, then Ready) costs
                # one sync per window, not one fresh list of the pods per change.
                key = owner_key(ref.kind, pod.namespace, ref.name)  # type: ignore[union-attr]
                self.queue.add_after(key, POD_EVENT_BATCH)

    async def sync(self, key: str) -> float | None:
        kind, _, rest = key.partition(":")
        ns, _, name = rest.partition("/")
        cls = OWNER_KINDS[kind]
        owner = await self.store.get(cls, name, ns)
        if owner is None or owner.metadata.deletion_timestamp:
            return None  # its pods: the garbage collector's (control/garbagecollector.py)
        pods, _ = await self.store.list(Pod, ns)
        mine: list[Pod] = []
        released: list[Pod] = []
        for p in pods:
            ref = controller_ref(p)
            if ref is None or ref.kind != kind or ref.name != name:
                continue
            if ref.uid == owner.metadata.uid:
                if selects(owner, p.metadata.labels):
                    mine.append(p)
                else:
                    released.append(p)  # relabelled out of the set, as for debugging
        for p in released:
            await self._release(p)
        active = [p for p in mine if not terminating(p) and not finished(p)]
        if isinstance(owner, Deployment):
            step = self._rollout(key, owner, mine, active)
            if step is not None:
                return await self._apply(key, owner, active, step.create, step.delete)
        want = owner.spec.replicas
        more = None
        if len(active) < want:
            # At most MAX_CREATE per sync (kube's burst), so a typo like 100000
            # replicas shows up in `corral get` long before it fills etcd.
            n = min(want - len(active), MAX_CREATE)
            log.info("%s: creating %d pods (%d/%d)", key, n, len(active), want)
            created = await self._bounded(self._create(owner) for _ in range(n))
            active += [p for p in created if p is not None]
            more = 0.0 if len(active) < want else None
        elif len(active) > want:
            victims = sorted(active, key=deletion_rank)[: len(active) - want]
            log.info("%s: deleting %d pods (%d/%d)", key, len(victims), len(active), want)
            await self._bounded(delete_pod(self.store, p) for p in victims)
            gone = {p.name for p in victims}
            active = [p for p in active if p.name not in gone]
        again = await self._update_status(owner, active)
        return more if more is not None else again

    def _rollout(
        self, key: str, dep: Deployment, mine: list[Pod], active: list[Pod]
    ) -> Step | None:
        """The next rollout step while pods of an older template remain; None otherwise."""
        current = template_hash(dep.spec.template)

        def is_new(p: Pod) -> bool:
            return p.metadata.labels.get(TEMPLATE_HASH_LABEL) == current

        old = [p for p in active if not is_new(p)]
        draining = sum(1 for p in mine if terminating(p) and not is_new(p))
        if not old and not draining:
            return None
        try:
            strat = strategy(dep)
        except ValueError as e:
            log.error("%s: %s; rolling out with the defaults (25%% surge/unavailable)", key, e)
            strat = Strategy(
                max_surge=max(1, math.ceil(dep.spec.replicas / 4)),
                max_unavailable=dep.spec.replicas // 4,
            )
        if not old and strat.type == "RollingUpdate":
            return None
        now = time.time()
        return rollout_step(
            dep.spec.replicas,
            strat,
            [p for p in active if is_new(p)],
            old,
            draining,
            lambda p: available(p, dep.spec.min_ready_seconds, now),
            deletion_rank,
        )

    async def _apply(
        self, key: str, owner: Owner, active: list[Pod], create: int, victims: list[Pod]
    ) -> float | None:
        if create:
            log.info("%s: rolling out: creating %d pods", key, create)
            created = await self._bounded(self._create(owner) for _ in range(create))
            active = active + [p for p in created if p is not None]
        if victims:
            log.info("%s: rolling out: deleting %d old pods", key, len(victims))
            await self._bounded(delete_pod(self.store, p) for p in victims)
            gone = {p.name for p in victims}
            active = [p for p in active if p.name not in gone]
        again = await self._update_status(owner, active)
        # New pods turning Ready wake this sync through their watch events; the
        # minReadySeconds wait is covered by _update_status's requeue.
        return again

    async def _release(self, pod: Pod) -> None:
        def drop(p: Pod) -> Pod:
            p.metadata.owner_references = [
                r for r in p.metadata.owner_references if not r.controller
            ]
            return p

        log.info("releasing %s/%s: its labels no longer match", pod.namespace, pod.name)
        with contextlib.suppress(NotFound):
            await self.store.modify(Pod, pod.name, pod.namespace, drop)

    async def _create(self, owner: Owner) -> Pod | None:
        for _ in range(5):
            try:
                return await self.store.create(pod_from_template(owner))
            except AlreadyExists:
                continue  # name suffix collision: draw another
        raise RuntimeError(f"could not find a free pod name for {owner.name}")

    @staticmethod
    async def _bounded(coros: Any) -> list[Any]:
        sem = asyncio.Semaphore(BURST)

        async def one(c: Any) -> Any:
            async with sem:
                return await c

        return await asyncio.gather(*(one(c) for c in coros))

    async def _update_status(self, owner: Owner, active: list[Pod]) -> float | None:
        wall = time.time()
        min_ready = owner.spec.min_ready_seconds
        status = ReplicationControllerStatus(
            replicas=len(active),
            ready_replicas=sum(p.ready for p in active),
            available_replicas=sum(available(p, min_ready, wall) for p in active),
            observed_generation=owner.metadata.generation,
        )
        if status != owner.status:
            owner.status = status
            try:
                await self.store.update(owner)
            except NotFound:
                return None
            except Conflict:
                return 0.0  # changed under us: sync again
        if min_ready and status.available_replicas < status.ready_replicas:
            return float(min_ready)  # look again when those pods become available
        return None

    async def run(self) -> None:
        async with started(self.informers, stop=self._own_informers), Supervisor() as sv:
            sv.start(run_worker(self.queue, self.sync, "replication"), "replication-worker")
            await sv.wait()
