"""The namespace controller: a deleted namespace takes what it holds with it.

`corral delete namespace N` marks N (deletionTimestamp, status.phase
Terminating); this controller then, every `period` while N is terminating:

1. deletes N's objects, owners first (Deployments, ReplicationControllers,
   Services) so nothing recreates pods, then pods *gracefully* (each is
   marked and its node stops it within its terminationGracePeriodSeconds, as
   `corral delete pod` does), then Endpoints and EndpointSlices;
2. sets conditions that say what is left, as Kubernetes' namespace controller
   does (`NamespaceContentRemaining: Some resources are remaining: pods has 2
   resource instances`, `NamespaceDeletionContentFailure` when a delete failed);
3. once nothing is left under any namespaced prefix, removes N (a
   compare-and-swap on the revision it read, so a namespace re-created
   meanwhile is not removed).

At start it also creates the built-in namespaces that are missing, and a
Namespace for every namespace that holds objects but has none (a cluster made
before namespaces were objects).
"""

from __future__ import annotations

import contextlib
import json
import logging

from corral.api.informer import Informer, InformerFactory, started
from corral.api.namespaces import ensure_builtin, new_namespace
from corral.api.objects import (
    KINDS,
    NAMESPACE_NAME_LABEL,
    ConfigMap,
    Deployment,
    Endpoints,
    EndpointSlice,
    Namespace,
    NamespaceCondition,
    NetworkPolicy,
    Pod,
    ReplicationController,
    Secret,
    Service,
    TypedObject,
)
from corral.api.store import AlreadyExists, Conflict, NotFound, Store, kind_prefix
from corral.control import conditions
from corral.control.podlifecycle import delete_pod
from corral.daemon.runner import BoundedFrequencyRunner

log = logging.getLogger(__name__)

# Owners before what they make, pods before the endpoints that list them.
DELETE_ORDER: tuple[type[TypedObject], ...] = (
    Deployment,
    ReplicationController,
    Service,
    Pod,
    Endpoints,
    EndpointSlice,
    NetworkPolicy,
    ConfigMap,  # after the pods that mount them, as their volumes go with the pods
    Secret,
)
NAMESPACED = tuple(k for k in KINDS if k.NAMESPACED)
assert set(NAMESPACED) == set(DELETE_ORDER), "a new namespaced kind needs a place in DELETE_ORDER"


def set_condition(ns: Namespace, type_: str, status: str, reason: str, message: str) -> bool:
    """Set one condition; True if it changed (the transition time moves on a flip)."""
    return conditions.set_condition(
        ns.status.conditions, NamespaceCondition, type_, status, reason, message
    )


async def remaining(store: Store, ns: str) -> dict[str, int]:
    """plural -> how many objects of that kind are still in `ns`."""
    out = {}
    for kind in DELETE_ORDER:
        n = len(await store.list_keys(kind_prefix(kind, ns)))
        if n:
            out[kind.PLURAL] = n
    return out


async def delete_contents(store: Store, ns: str, force: bool = False) -> list[str]:
    """Delete (or, for pods on a node, mark terminating) everything in `ns`; the
    errors met, one line each (the next round retries)."""
    errors = []
    for kind in DELETE_ORDER:
        objs, _ = await store.list(kind, ns)
        for o in objs:
            try:
                if isinstance(o, Pod):
                    if force or not o.metadata.deletion_timestamp:
                        await delete_pod(store, o, graceful=not force)
                else:
                    await store.delete(kind, o.name, ns)
            except (Conflict, NotFound):
                continue
            except Exception as e:  # etcd hiccup: said in the condition, retried
                errors.append(f"{kind.KIND} {o.name}: {type(e).__name__}: {e}")
    return errors


def describe_remaining(left: dict[str, int]) -> str:
    return "Some resources are remaining: " + ", ".join(
        f"{plural} has {n} resource instances" for plural, n in sorted(left.items())
    )


async def finalize(store: Store, ns: Namespace, force: bool = False) -> bool:
    """One round of deleting a terminating namespace; True once it is gone."""
    name = ns.name
    errors = await delete_contents(store, name, force=force)
    left = await remaining(store, name)
    if not left and not errors:
        try:
            await store.delete(Namespace, name, resource_version=ns.metadata.resource_version)
        except Conflict:
            return False  # changed meanwhile (its conditions, or made again): next round
        log.info("namespace %s: empty, removed", name)
        return True

    def change(cur: Namespace) -> Namespace | None:
        if cur.metadata.uid != ns.metadata.uid:
            return None
        changed = cur.status.phase != "Terminating"
        cur.status.phase = "Terminating"
        if left:
            changed |= set_condition(
                cur,
                "NamespaceContentRemaining",
                "True",
                "SomeResourcesRemain",
                describe_remaining(left),
            )
        else:
            changed |= set_condition(
                cur, "NamespaceContentRemaining", "False", "ContentRemoved", "All content removed"
            )
        if errors:
            changed |= set_condition(
                cur,
                "NamespaceDeletionContentFailure",
                "True",
                "ContentDeletionFailed",
                "Failed to delete all resource types, " + "; ".join(errors[:3]),
            )
        else:
            changed |= set_condition(
                cur,
                "NamespaceDeletionContentFailure",
                "False",
                "ContentDeleted",
                "All content successfully deleted, may be waiting on finalization",
            )
        return cur if changed else None

    with contextlib.suppress(NotFound, Conflict):
        await store.modify(Namespace, name, None, change)
    return False


async def adopt(store: Store) -> list[str]:
    """Create a Namespace for each namespace that holds objects but has none."""
    have = {n.name for n in (await store.list(Namespace))[0]}
    seen: set[str] = set()
    for kind in NAMESPACED:
        prefix = kind_prefix(kind)
        for key in await store.list_keys(prefix):
            ns = key.removeprefix(prefix).split("/", 1)[0]
            seen.add(ns)
    made = []
    for ns in sorted(seen - have):
        try:
            await store.create(new_namespace(ns))
        except (AlreadyExists, ValueError):  # made meanwhile, or a name no Namespace can have
            continue
        log.info("namespace %s holds objects but had no Namespace object: created it", ns)
        made.append(ns)
    return made


async def label_names(store: Store) -> list[str]:
    """Give namespaces stored before the `kubernetes.io/metadata.name` label existed the
    label (decoding adds it, so writing each back once stores it); the names labelled."""
    kvs, _ = await store.list_raw(kind_prefix(Namespace))
    done = []
    for kv in kvs:
        try:
            labels = json.loads(kv.value).get("metadata", {}).get("labels") or {}
        except ValueError:
            continue
        name = kv.key.removeprefix(kind_prefix(Namespace))
        if labels.get(NAMESPACE_NAME_LABEL) == name:
            continue
        with contextlib.suppress(NotFound, Conflict, ValueError):
            await store.modify(Namespace, name, None, lambda cur: cur)
            done.append(name)
    if done:
        log.info("labelled namespaces %s with %s", ", ".join(done), NAMESPACE_NAME_LABEL)
    return done


class NamespaceController:
    def __init__(
        self, store: Store, period: float = 1.0, informers: InformerFactory | None = None
    ) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.namespaces: Informer[Namespace] = self.informers.informer(Namespace)
        self.runner = BoundedFrequencyRunner(
            "namespaces", self._sweep, 0.1, period, run_at_start=True
        )
        self.namespaces.on_change(self._changed)

    def _changed(self, old: object, new: object) -> None:
        if isinstance(new, Namespace) and new.terminating:
            self.runner.run_soon()

    async def sweep(self) -> None:
        for ns in self.namespaces.values():
            if ns.terminating:
                await finalize(self.store, ns)

    async def _sweep(self, full: bool) -> None:
        try:
            await self.sweep()
        except Exception as e:  # etcd hiccup: the next sweep retries
            log.warning("namespace sweep failed: %s: %s", type(e).__name__, e)

    async def run(self) -> None:
        async with started(self.informers, stop=self._own_informers):
            made = await ensure_builtin(self.store)
            if made:
                log.info("created the built-in namespaces %s", ", ".join(made))
            await adopt(self.store)
            try:
                await label_names(self.store)
            except Exception as e:  # etcd hiccup: the next start labels them
                log.warning("labelling namespaces failed: %s: %s", type(e).__name__, e)
            await self.namespaces.wait_synced()
            await self.runner.run()
