"""The garbage collector: what an owner leaves behind goes too, as Kubernetes' does.

Any object may name owners (`metadata.ownerReferences`, matched by uid): the pods of
a ReplicationController or Deployment, the Endpoints and EndpointSlices of a Service.
- **Background** (a plain delete): a dependent none of whose owners exists any more
  is deleted (a pod gracefully: its node stops it); one that lost only some of its
  owners just loses those references.
- **Orphan** (`propagationPolicy: Orphan`): the owner is marked with the `orphan`
  finalizer; its dependents lose their references to it, then the finalizer goes
  and with it the owner.
- **Foreground** (`propagationPolicy: Foreground`): the owner is marked with
  `foregroundDeletion`; its dependents are deleted first, and once none is left the
  finalizer goes and with it the owner.
An owner counts as gone only when a fresh read from etcd says so: the caches may lag
behind a create.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from corral.api.finalizers import FOREGROUND, ORPHAN, removable
from corral.api.informer import BY_OWNER, Informer, InformerFactory, by_owner, started
from corral.api.objects import KINDS, OwnerReference, Pod, TypedObject
from corral.api.store import Conflict, NotFound, Store, now_iso
from corral.control.podlifecycle import delete_pod
from corral.control.workqueue import WorkQueue

log = logging.getLogger(__name__)

RESYNC = 60.0  # seconds between full passes (what a missed event would leave)
RETRY = 5.0
BY_KIND = {k.KIND: k for k in KINDS}


def _key(role: str, obj: TypedObject) -> str:
    return f"{role}|{obj.KIND}|{obj.namespace or ''}|{obj.name}"


def _wire(obj: TypedObject) -> dict[str, Any]:
    return {"kind": obj.KIND, **obj.model_dump(by_alias=True, exclude_none=True)}


class GarbageCollector:
    def __init__(self, store: Store, informers: InformerFactory | None = None) -> None:
        self.store = store
        self._own = informers is None
        self.factory = informers or InformerFactory(store)
        self.informers: dict[str, Informer[Any]] = {}
        for k in KINDS:
            inf = self.factory.informer(k)
            inf.add_index(BY_OWNER, by_owner)
            self.informers[k.KIND] = inf
        self.queue = WorkQueue()
        self.deleted = 0  # dependents deleted (for the debug dump and tests)

    # ------------------------------------------------------------ events

    def _changed(self, old: TypedObject | None, new: TypedObject | None) -> None:
        obj = new or old
        assert obj is not None
        if new is not None and new.metadata.owner_references:
            self.queue.add(_key("dep", new))
        gc_finalizers = {ORPHAN, FOREGROUND} & set(new.metadata.finalizers if new else ())
        if new is not None and new.metadata.deletion_timestamp and gc_finalizers:
            self.queue.add(_key("owner", new))
        if new is None:  # gone: its dependents may be orphans now
            for d in self._dependents(obj.metadata.uid or ""):
                self.queue.add(_key("dep", d))
        for r in obj.metadata.owner_references:  # an owner in foreground waits for this one
            cls = BY_KIND.get(r.kind)
            if cls is not None:
                owner = self.informers[r.kind].get(
                    r.name, obj.namespace if cls.NAMESPACED else None
                )
                if owner is not None and owner.metadata.deletion_timestamp:
                    self.queue.add(_key("owner", owner))

    def _dependents(self, uid: str) -> list[TypedObject]:
        return [d for inf in self.informers.values() for d in inf.by_index(BY_OWNER, uid)]

    def _resync(self) -> None:
        for inf in self.informers.values():
            for obj in inf.values():
                self._changed(None, obj)

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        regs = [inf.on_change(self._changed) for inf in self.informers.values()]
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self._own:
                    await stack.enter_async_context(started(self.factory))
                for inf in self.informers.values():
                    await inf.wait_synced()
                resync = asyncio.create_task(self._resync_loop())
                try:
                    while True:
                        key = await self.queue.get()
                        try:
                            await self._process(key)
                        except (Conflict, NotFound):
                            self.queue.add_after(key, 0.2)
                        except Exception:
                            log.exception("garbage collector: %s", key)
                            self.queue.add_after(key, RETRY)
                        finally:
                            self.queue.done(key)
                finally:
                    resync.cancel()
        finally:
            for r in regs:
                r.remove()

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(RESYNC)
            self._resync()

    async def _process(self, key: str) -> None:
        role, kind, ns, name = key.split("|", 3)
        cls = BY_KIND[kind]
        obj = await self.store.get(cls, name, ns or None)
        if obj is None:
            return
        if role == "dep":
            await self._dependent(obj)
        else:
            await self._owner(obj)

    # ------------------------------------------------------------ dependents

    async def _owner_state(self, obj: TypedObject, ref: OwnerReference) -> str:
        """present, absent, or foreground (being deleted, dependents first)."""
        cls = BY_KIND.get(ref.kind)
        if cls is None:
            return "present"  # a kind corral does not have: never assume it gone
        owner = await self.store.get(cls, ref.name, obj.namespace if cls.NAMESPACED else None)
        if owner is None or owner.metadata.uid != ref.uid:
            return "absent"
        if owner.metadata.deletion_timestamp and FOREGROUND in owner.metadata.finalizers:
            return "foreground"
        return "present"

    async def _dependent(self, obj: TypedObject) -> None:
        refs = obj.metadata.owner_references
        if not refs or obj.metadata.deletion_timestamp:
            return
        states = {r.uid: await self._owner_state(obj, r) for r in refs}
        if "present" not in states.values():
            log.info(
                "%s %s/%s: its owners are gone, deleting it", obj.KIND, obj.namespace, obj.name
            )
            await self._delete(obj)
            return
        absent = {uid for uid, s in states.items() if s == "absent"}
        if absent:
            await self._drop_refs(obj, absent)

    async def _delete(self, obj: TypedObject) -> None:
        self.deleted += 1
        if obj.metadata.finalizers:  # it stays until its own finalizers are done
            await self._mark(obj)
            return
        if isinstance(obj, Pod):
            await delete_pod(self.store, obj)
            return
        with contextlib.suppress(NotFound):
            await self.store.delete(
                type(obj), obj.name, obj.namespace, obj.metadata.resource_version
            )

    async def _mark(self, obj: TypedObject) -> None:
        def mark(cur: TypedObject) -> TypedObject | None:
            if cur.metadata.deletion_timestamp:
                return None
            cur.metadata.deletion_timestamp = now_iso()
            on_node = isinstance(cur, Pod) and cur.spec.node_name
            grace = cur.spec.termination_grace_period_seconds if on_node else 0  # type: ignore[attr-defined]
            cur.metadata.deletion_grace_period_seconds = grace
            return cur

        with contextlib.suppress(NotFound):
            await self.store.modify(type(obj), obj.name, obj.namespace, mark)

    async def _drop_refs(self, obj: TypedObject, uids: set[str]) -> None:
        def drop(cur: TypedObject) -> TypedObject | None:
            keep = [r for r in cur.metadata.owner_references if r.uid not in uids]
            if len(keep) == len(cur.metadata.owner_references):
                return None
            cur.metadata.owner_references = keep
            return cur

        with contextlib.suppress(NotFound):
            await self.store.modify(type(obj), obj.name, obj.namespace, drop)

    # ------------------------------------------------------------ owners

    async def _owner(self, owner: TypedObject) -> None:
        fins = owner.metadata.finalizers
        if not owner.metadata.deletion_timestamp:
            return
        uid = owner.metadata.uid or ""
        deps = await self._live_dependents(owner)
        if ORPHAN in fins:
            for d in deps:
                await self._drop_refs(d, {uid})
            log.info("%s %s/%s: dependents orphaned", owner.KIND, owner.namespace, owner.name)
            await self._finish(owner, ORPHAN)
        elif FOREGROUND in fins:
            if deps:
                for d in deps:
                    if not d.metadata.deletion_timestamp:
                        await self._delete(d)
                self.queue.add_after(_key("owner", owner), 1.0)  # until they are gone
                return
            await self._finish(owner, FOREGROUND)

    async def _live_dependents(self, owner: TypedObject) -> list[TypedObject]:
        """Dependents read from etcd (the owner's namespace; every namespace for a
        cluster-scoped owner), not from the caches: a decision to let the owner go."""
        uid = owner.metadata.uid
        out: list[TypedObject] = []
        for cls in KINDS:
            if owner.NAMESPACED and not cls.NAMESPACED:
                continue
            objs, _ = await self.store.list(cls, owner.namespace if owner.NAMESPACED else None)
            out += [o for o in objs if any(r.uid == uid for r in o.metadata.owner_references)]
        return out

    async def _finish(self, owner: TypedObject, finalizer: str) -> None:
        """Remove `finalizer`; the owner goes when it was the last."""

        def drop(cur: TypedObject) -> TypedObject | None:
            if cur.metadata.uid != owner.metadata.uid or finalizer not in cur.metadata.finalizers:
                return None
            cur.metadata.finalizers = [f for f in cur.metadata.finalizers if f != finalizer]
            return cur

        try:
            cur = await self.store.modify(type(owner), owner.name, owner.namespace, drop)
        except NotFound:
            return
        if cur.metadata.uid == owner.metadata.uid and removable(_wire(cur)):
            with contextlib.suppress(NotFound, Conflict):
                await self.store.delete(
                    type(cur), cur.name, cur.namespace, cur.metadata.resource_version
                )
                log.info(
                    "%s %s/%s: deleted (%s done)", cur.KIND, cur.namespace, cur.name, finalizer
                )

    def debug_state(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "deleted": self.deleted}
