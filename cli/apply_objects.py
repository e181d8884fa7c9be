"""What `corral apply` writes, in batches: one read per kind, many objects per transaction.

For the objects of one apply (already validated, every document of every file):

1. What exists is read once per kind and namespace (a prefix list; only the
   objects being applied are decoded), or by key when only a few are applied.
2. Each object becomes what `Store.put` would write: uid, creationTimestamp and
   status kept, generation bumped on a spec change, a Service's allocated VIP
   and node ports kept. One that would not change is not written ("unchanged").
3. The writes go in transactions of up to `MAX_TXN_OPS` objects and
   `MAX_TXN_BYTES`, a few at a time; each is a create-if-absent or a CAS on the
   revision read in step 1, so nothing written meanwhile is overwritten unseen.
   A batch whose CAS fails (someone wrote one of its objects in between) is
   applied again object by object, re-reading each (`Store.put`).

The verbs (`created`, `configured`, `unchanged`) are what each object was
before this apply, in the order of the documents.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from corral.api.namespaces import check_namespaces
from corral.api.objects import Namespace, Pod, Service, TypedObject, update_forbidden
from corral.api.store import KV, Conflict, Store, batched, kind_prefix, object_key
from corral.runtime.podstatus import ANN_CONTAINERS, ANN_RUNTIME

# Fewer objects of one kind and namespace than this are read by key, not by a list.
GET_BY_KEY_BELOW = 32
# Transactions in flight at once (etcd pipelines them; more buys nothing on 2 cores).
IN_FLIGHT = 8


@dataclass
class Planned:
    obj: TypedObject
    before: TypedObject | None
    verb: str  # created | configured | unchanged
    data: bytes = b""  # the encoded object (for the batch's byte budget)


async def read_existing(store: Store, objs: Sequence[TypedObject]) -> dict[str, KV]:
    """The stored records of `objs` that exist, by etcd key: one list per kind and
    namespace (or gets, for a handful)."""
    groups: dict[tuple[type[TypedObject], str | None], list[str]] = defaultdict(list)
    for o in objs:
        ns = o.namespace if type(o).NAMESPACED else None
        groups[(type(o), ns)].append(object_key(type(o), o.name, o.namespace))
    found: dict[str, KV] = {}

    async def one(kind: type[TypedObject], ns: str | None, keys: list[str]) -> None:
        if len(keys) < GET_BY_KEY_BELOW:
            for kv in await asyncio.gather(*(store.get_raw(k) for k in keys)):
                if kv is not None:
                    found[kv.key] = kv
            return
        wanted = set(keys)
        kvs, _ = await store.list_raw(kind_prefix(kind, ns))
        for kv in kvs:
            if kv.key in wanted:
                found[kv.key] = kv

    await asyncio.gather(*(one(k, ns, keys) for (k, ns), keys in groups.items()))
    return found


def keep_allocated(before: Service, new: Service) -> None:
    """Keep the VIP and node ports the cluster gave `before` where `new` leaves them
    unset, as kubectl apply does: re-applying a manifest must not drop a live VIP."""
    if not new.spec.cluster_ip and before.spec.cluster_ip and new.spec.type != "ExternalName":
        new.spec.cluster_ip = before.spec.cluster_ip
        new.spec.cluster_ips = list(before.spec.cluster_ips)
    old_ports = {(p.port, p.protocol): p.node_port for p in before.spec.ports}
    if new.spec.type in ("NodePort", "LoadBalancer"):
        for p in new.spec.ports:
            if p.node_port is None:
                p.node_port = old_ports.get((p.port, p.protocol))


def keep_bound(before: Pod, new: Pod) -> None:
    """A re-applied manifest of a running pod keeps what the cluster gave it: the node
    the scheduler bound it to and the runtime's annotations (where its files and
    processes are), as kubectl apply's merge does. Dropping them would stop the pod."""
    if not new.spec.node_name and before.spec.node_name:
        new.spec.node_name = before.spec.node_name
    for k in (ANN_RUNTIME, ANN_CONTAINERS):
        if k in before.metadata.annotations and k not in new.metadata.annotations:
            new.metadata.annotations[k] = before.metadata.annotations[k]


def same(a: TypedObject, b: TypedObject) -> bool:
    """Equal but for resourceVersion and generation."""
    da, db = a.dump(), b.dump()
    for d in (da, db):
        d.get("metadata", {}).pop("resourceVersion", None)
        d.get("metadata", {}).pop("generation", None)
    return da == db


def carry_over(before: TypedObject, obj: TypedObject, revision: int) -> None:
    """Make `obj` the replacement of `before` (what `Store.put` does to it)."""
    md, old = obj.metadata, before.metadata
    md.uid = old.uid
    md.creation_timestamp = old.creation_timestamp
    spec_changed = getattr(old, "spec", None) != getattr(obj, "spec", None)
    md.generation = (old.generation or 1) + (1 if spec_changed else 0)
    if "status" in type(obj).model_fields and "status" not in obj.model_fields_set:
        obj.status = before.status  # type: ignore[attr-defined]
    md.resource_version = str(revision)


class ImmutableError(ValueError):
    """An update changes what may not change (an immutable ConfigMap's data, ...)."""


def plan(objs: Sequence[TypedObject], existing: dict[str, KV]) -> list[Planned]:
    out = []
    for obj in objs:
        kv = existing.get(object_key(type(obj), obj.name, obj.namespace))
        if kv is None:
            out.append(Planned(obj, None, "created"))
            continue
        before = Store.decode(type(obj), kv)
        if isinstance(before, Service):
            keep_allocated(before, obj)  # type: ignore[arg-type]
        if isinstance(before, Pod):
            keep_bound(before, obj)  # type: ignore[arg-type]
        carry_over(before, obj, kv.mod_revision)
        refused = update_forbidden(before, obj)
        if refused:
            raise ImmutableError(
                "\n".join(
                    f"{obj.KIND} {obj.name!r} is invalid: {f}: {m}; nothing was changed"
                    for f, m in refused
                )
            )
        out.append(Planned(obj, before, "unchanged" if same(before, obj) else "configured"))
    return out


async def _write_batch(store: Store, batch: list[Planned], gate: asyncio.Semaphore) -> None:
    async with gate:
        creates = [p.obj for p in batch if p.before is None]
        updates = [p.obj for p in batch if p.before is not None]
        try:
            await store.commit(creates=creates, updates=updates)
            return
        except Conflict:
            pass
        # Someone wrote one of these since we read them: one by one, re-reading each.
        for p in batch:
            cur = await store.get(type(p.obj), p.obj.name, p.obj.namespace)
            p.obj.metadata.resource_version = None
            if isinstance(cur, Service):
                keep_allocated(cur, p.obj)  # type: ignore[arg-type]
            if isinstance(cur, Pod):
                keep_bound(cur, p.obj)  # type: ignore[arg-type]
            await store.put(p.obj)
            p.before = cur
            p.verb = (
                "created" if cur is None else ("unchanged" if same(cur, p.obj) else "configured")
            )


async def apply_objects(store: Store, objs: Sequence[TypedObject]) -> list[Planned]:
    """Create or update every object (see the module's doc); the plan, in order.
    NamespaceError (nothing written) if an object to create is in a namespace that
    does not exist or is terminating."""
    planned = plan(objs, await read_existing(store, objs))
    coming = [o.name for o in objs if isinstance(o, Namespace)]
    await check_namespaces(store, [p.obj for p in planned if p.before is None], coming)
    writes = [p for p in planned if p.verb != "unchanged"]
    for p in writes:
        if p.before is None:
            Store.prepare_create(p.obj)
        p.data = Store.encode(p.obj)
    gate = asyncio.Semaphore(IN_FLIGHT)
    # Namespaces first: what goes into them is never stored before they are.
    for group in (
        [p for p in writes if isinstance(p.obj, Namespace)],
        [p for p in writes if not isinstance(p.obj, Namespace)],
    ):
        batches = batched(group, size=lambda p: len(p.data) + 128)
        await asyncio.gather(*(_write_batch(store, b, gate) for b in batches))
    return planned
