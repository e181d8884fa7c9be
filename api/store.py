"""The etcd store: typed get/list/create/CAS/delete/watch over one key schema.

Key schema (every key corral writes lives here; values are JSON):

    /corral/v1/<plural>/<name>                       cluster-scoped kinds
                                                     (nodes, networkconfigs)
    /corral/v1/<plural>/<namespace>/<name>           namespaced kinds (pods,
                                                     services, endpoints, ...)
    /corral/v1/subnets/<a.b.c.d>-<len>               SubnetLease; the key is
                                                     attached to an etcd lease
                                                     so it expires with its node
    /corral/v1/ipam/<pool>/ips/<ip>                  IPAllocation (pool is the
                                                     range, e.g. 10.244.1.0-24)
    /corral/v1/ipam/<pool>/owners/<containerID>/<ifname>
                                                     the IP that attachment
                                                     holds: O(1) release

An object's `metadata.resourceVersion` is the etcd mod revision of its key; an
update is a compare-and-swap on it. Watches resume from the last revision they
saw; if that revision was compacted they re-list and emit the difference, so a
consumer never misses a change and never sees one twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

import aetcd
import aetcd.exceptions
import aetcd.utils

from corral.api.objects import TypedObject
from corral.daemon import metrics

log = logging.getLogger(__name__)

PREFIX = "/corral/v1"
T = TypeVar("T", bound=TypedObject)


class StoreError(Exception):
    pass


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class Conflict(StoreError):
    """The object changed since it was read (resourceVersion mismatch)."""


class Unavailable(StoreError):
    """No etcd endpoint answered."""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kind_prefix(kind: type[TypedObject], namespace: str | None = None) -> str:
    if kind.NAMESPACED and namespace:
        return f"{PREFIX}/{kind.PLURAL}/{namespace}/"
    return f"{PREFIX}/{kind.PLURAL}/"


def object_key(kind: type[TypedObject], name: str, namespace: str | None = None) -> str:
    if kind.NAMESPACED:
        return f"{PREFIX}/{kind.PLURAL}/{namespace or 'default'}/{name}"
    return f"{PREFIX}/{kind.PLURAL}/{name}"


def subnet_key(subnet: str) -> str:
    return f"{PREFIX}/subnets/{subnet.replace('/', '-')}"


SUBNETS_PREFIX = f"{PREFIX}/subnets/"


def pool_id(cidr: str) -> str:
    return cidr.replace("/", "-")


def ipam_ip_key(pool: str, ip: str) -> str:
    return f"{PREFIX}/ipam/{pool}/ips/{ip}"


def ipam_owner_key(pool: str, container_id: str, ifname: str) -> str:
    return f"{PREFIX}/ipam/{pool}/owners/{container_id}/{ifname}"


def parse_endpoints(urls: str | list[str]) -> list[tuple[str, int]]:
    """`http://h:p,http://h2:p2` (or a list) to [(host, port)]; ValueError names the bad one."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for raw in (u.strip() for u in items):
        if not raw:
            continue
        u = urlparse(raw if "://" in raw else f"http://{raw}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"etcd endpoint {raw!r} is not a URL like http://127.0.0.1:2379")
        if u.scheme == "https":
            raise ValueError(f"etcd endpoint {raw!r}: TLS endpoints are not supported yet")
        try:
            port = u.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {raw!r} has an invalid port") from None
        out.append((u.hostname, port))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


@dataclass
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass
class RawEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    key: str
    value: bytes | None
    revision: int


@dataclass
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    object: Any
    revision: int


_CONN_ERRORS = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
)


class Store:
    """An etcd client over one or more endpoints, failing over between them."""

    def __init__(self, endpoints: str | list[str], timeout: float = 5.0) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self._idx = 0
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        host, port = self.endpoints[self._idx]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the first endpoint that answers; Unavailable names them all."""
        errors = []
        for i in range(len(self.endpoints)):
            idx = (self._idx + i) % len(self.endpoints)
            host, port = self.endpoints[idx]
            client = aetcd.Client(
                host=host,
                port=port,
                timeout=self.timeout,
                connect_wait_timeout=max(1, int(self.timeout)),
            )
            try:
                await client.connect()
                await asyncio.wait_for(client.status(), self.timeout)
            except (*_CONN_ERRORS, TimeoutError, OSError) as e:
                with contextlib.suppress(Exception):
                    await client.close()
                errors.append(f"http://{host}:{port} ({type(e).__name__})")
                continue
            old, self._client, self._idx = self._client, client, idx
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.close()
            return
        raise Unavailable("cannot reach etcd at " + ", ".join(errors))

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def _call(self, fn: Callable[[aetcd.Client], Any]) -> Any:
        """Run one RPC, reconnecting (to the next endpoint if need be) once on failure."""
        op = sys._getframe(1).f_code.co_name  # the Store method: the metrics' `op` label
        t0 = time.perf_counter()
        try:
            if self._client is None:
                await self.connect()
            try:
                return await fn(self._client)
            except _CONN_ERRORS:
                async with self._lock:
                    self._idx = (self._idx + 1) % len(self.endpoints)
                    await self.connect()
                return await fn(self._client)
        except Exception as e:
            metrics.ETCD_REQUEST_ERRORS.labels(op, type(e).__name__).inc()
            raise
        finally:
            metrics.ETCD_REQUEST_SECONDS.labels(op).observe(time.perf_counter() - t0)

    # ------------------------------------------------------------ raw keys

    async def get_raw(self, key: str) -> KV | None:
        r = await self._call(lambda c: c.get(key.encode()))
        if r is None:
            return None
        return KV(key, r.value, r.mod_revision, r.create_revision, r.lease)

    async def list_raw(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under `prefix` and the store revision they were read at."""
        r = await self._call(lambda c: c.get_prefix(prefix.encode()))
        kvs = [
            KV(kv.key.decode(), kv.value, kv.mod_revision, kv.create_revision, kv.lease) for kv in r
        ]
        rev = r.header.revision if getattr(r, "header", None) is not None else await self.revision()
        return kvs, rev

    async def revision(self) -> int:
        r = await self._call(lambda c: c.get(b"/corral/"))
        if r is not None:
            return r.header.revision
        st = await self._call(lambda c: c.get_prefix(b"/corral/nonexistent/"))
        return st.header.revision

    async def put_raw(self, key: str, value: bytes, lease: int | None = None) -> int:
        r = await self._call(lambda c: c.put(key.encode(), value, lease=lease))
        return r.header.revision

    async def create_raw(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Create `key` only if absent; returns the revision; AlreadyExists otherwise."""
        ok, rev = await self.txn(
            compare=[("create", key, "==", 0)], success=[("put", key, value, lease)]
        )
        if not ok:
            raise AlreadyExists(key)
        return rev

    async def cas_raw(
        self, key: str, value: bytes, mod_revision: int, lease: int | None = None
    ) -> int:
        """Replace `key` only if its mod revision is still `mod_revision`."""
        ok, rev = await self.txn(
            compare=[("mod", key, "==", mod_revision)], success=[("put", key, value, lease)]
        )
        if not ok:
            raise Conflict(key)
        return rev

    async def delete_raw(self, key: str, mod_revision: int | None = None) -> bool:
        """Delete `key` (only at `mod_revision` if given). True if something was deleted."""
        if mod_revision is None:
            r = await self._call(lambda c: c.delete(key.encode()))
            return r is not None
        ok, _ = await self.txn(
            compare=[("mod", key, "==", mod_revision)], success=[("delete", key)]
        )
        if not ok:
            cur = await self.get_raw(key)
            if cur is None:
                return False
            raise Conflict(key)
        return True

    async def delete_prefix_raw(self, prefix: str) -> int:
        r = await self._call(lambda c: c.delete_prefix(prefix.encode()))
        return getattr(r, "deleted", 0) or 0

    async def txn(
        self, compare: list[tuple], success: list[tuple], failure: list[tuple] | None = None
    ) -> tuple[bool, int]:
        """A transaction over simple tuples, so callers need not touch aetcd.

        compare: ("create"|"mod"|"version"|"value", key, op, target)
        ops:     ("put", key, value[, lease]) | ("delete", key)
        Returns (succeeded, revision).
        """

        def build(c: aetcd.Client) -> Any:
            t = c.transactions
            cmps = []
            for what, key, op, target in compare:
                target_b = target.encode() if isinstance(target, str) else target
                base = {"create": t.create, "mod": t.mod, "version": t.version, "value": t.value}[
                    what
                ](key.encode())
                cmps.append(
                    {"==": base.__eq__, "!=": base.__ne__, "<": base.__lt__, ">": base.__gt__}[op](
                        target_b
                    )
                )

            def ops(items: list[tuple] | None) -> list[Any]:
                out = []
                for item in items or []:
                    if item[0] == "put":
                        lease = item[3] if len(item) > 3 else None
                        out.append(t.put(item[1].encode(), item[2], lease=lease))
                    elif item[0] == "delete":
                        out.append(t.delete(item[1].encode()))
                    else:
                        raise ValueError(f"unknown txn op {item[0]!r}")
                return out

            return c.transaction(compare=cmps, success=ops(success), failure=ops(failure))

        async def run(c: aetcd.Client) -> tuple[bool, int]:
            ok, responses = await build(c)
            rev = 0
            for r in responses:
                hdr = None
                if hasattr(r, "response_put") and r.HasField("response_put"):
                    hdr = r.response_put.header
                elif hasattr(r, "response_delete_range") and r.HasField("response_delete_range"):
                    hdr = r.response_delete_range.header
                if hdr is not None:
                    rev = max(rev, hdr.revision)
            return ok, rev

        return await self._call(run)

    # ------------------------------------------------------------ leases

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._call(lambda c: c.lease(ttl))
        return lease.id

    async def refresh_lease(self, lease_id: int) -> int:
        """Renew a lease; returns the remaining TTL, 0 (or less) if it has expired."""
        r = await self._call(lambda c: c.refresh_lease(lease_id))
        # aetcd returns the keep-alive responses; the last one carries the TTL.
        ttl = None
        if hasattr(r, "__aiter__"):
            async for resp in r:
                ttl = resp.TTL
        elif isinstance(r, list | tuple):
            ttl = r[-1].TTL if r else 0
        else:
            ttl = getattr(r, "TTL", 0)
        return int(ttl or 0)

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(aetcd.exceptions.ClientError):
            await self._call(lambda c: c.revoke_lease(lease_id))

    async def compact(self, revision: int) -> None:
        await self._call(lambda c: c.compact(revision, physical=True))

    # ------------------------------------------------------------ raw watch

    async def watch_prefix_raw(
        self, prefix: str, start_revision: int, known: dict[str, int] | None = None
    ) -> AsyncIterator[RawEvent]:
        """Events under `prefix` from `start_revision` on, surviving compaction and reconnects.

        `known` maps key -> mod revision of what the caller already has (from its
        list); it is kept up to date and used to turn a re-list into the exact
        ADDED/MODIFIED/DELETED events the caller missed.
        """
        known = {} if known is None else known
        next_rev = start_revision
        backoff = 0.1
        while True:
            try:
                async for ev in self._watch_once(prefix, next_rev, known):
                    next_rev = ev.revision + 1
                    backoff = 0.1
                    yield ev
            except aetcd.exceptions.RevisionCompactedError:
                log.info("watch on %s: revision %d compacted; re-listing", prefix, next_rev)
                metrics.WATCH_RESTARTS.labels("compacted").inc()
                missed, next_rev = await self._relist(prefix, known)
                for ev in missed:
                    yield ev
                continue
            except (*_CONN_ERRORS, Unavailable) as e:
                log.warning("watch on %s interrupted (%s); retrying in %.1fs", prefix, e, backoff)
                metrics.WATCH_RESTARTS.labels("reconnect").inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                with contextlib.suppress(Unavailable, *_CONN_ERRORS):
                    async with self._lock:
                        self._idx = (self._idx + 1) % len(self.endpoints)
                        await self.connect()
                continue

    async def _watch_once(
        self, prefix: str, start: int, known: dict[str, int]
    ) -> AsyncIterator[RawEvent]:
        if self._client is None:
            await self.connect()
        w = await self._client.watch(
            prefix.encode(),
            range_end=aetcd.utils.prefix_range_end(prefix.encode()),
            start_revision=start,
        )
        try:
            async for ev in w:
                key = ev.kv.key.decode()
                rev = ev.kv.mod_revision
                if ev.kind == "DELETE":
                    known.pop(key, None)
                    yield RawEvent("DELETED", key, None, rev)
                else:
                    typ = "MODIFIED" if key in known else "ADDED"
                    known[key] = rev
                    yield RawEvent(typ, key, ev.kv.value, rev)
            raise aetcd.exceptions.ConnectionFailedError("watch stream ended")
        finally:
            with contextlib.suppress(Exception):
                await w.cancel()

    async def _relist(self, prefix: str, known: dict[str, int]) -> tuple[list[RawEvent], int]:
        """The events that turn `known` into what is stored now, and the revision to resume at."""
        kvs, rev = await self.list_raw(prefix)
        current = {kv.key: kv for kv in kvs}
        out = []
        for key in sorted(set(known) - set(current)):
            known.pop(key)
            out.append(RawEvent("DELETED", key, None, rev))
        for key, kv in current.items():
            if key not in known:
                out.append(RawEvent("ADDED", key, kv.value, kv.mod_revision))
            elif known[key] != kv.mod_revision:
                out.append(RawEvent("MODIFIED", key, kv.value, kv.mod_revision))
            known[key] = kv.mod_revision
        return out, rev + 1

    # ------------------------------------------------------------ typed objects

    @staticmethod
    def decode(kind: type[T], kv: KV | RawEvent) -> T:
        obj = kind.model_validate(json.loads(kv.value))
        rev = kv.mod_revision if isinstance(kv, KV) else kv.revision
        obj.metadata.resource_version = str(rev)
        return obj

    @staticmethod
    def encode(obj: TypedObject) -> bytes:
        d = obj.dump()
        d.get("metadata", {}).pop("resourceVersion", None)
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    async def get(self, kind: type[T], name: str, namespace: str | None = None) -> T | None:
        kv = await self.get_raw(object_key(kind, name, namespace))
        return None if kv is None else self.decode(kind, kv)

    async def list(self, kind: type[T], namespace: str | None = None) -> tuple[list[T], int]:
        kvs, rev = await self.list_raw(kind_prefix(kind, namespace))
        return [self.decode(kind, kv) for kv in kvs], rev

    async def create(self, obj: T) -> T:
        """Create-if-absent. Fills uid, creationTimestamp and a generated name."""
        kind = type(obj)
        md = obj.metadata
        if not md.name:
            if not md.generate_name:
                raise ValueError("metadata.name or metadata.generateName is required")
            md.name = md.generate_name + secrets.token_hex(3)[:5]
        md.uid = md.uid or str(uuid.uuid4())
        md.creation_timestamp = md.creation_timestamp or now_iso()
        md.generation = md.generation or 1
        md.resource_version = None
        rev = await self.create_raw(object_key(kind, md.name, md.namespace), self.encode(obj))
        md.resource_version = str(rev)
        return obj

    async def update(self, obj: T) -> T:
        """Compare-and-swap on metadata.resourceVersion; Conflict if it moved on."""
        kind = type(obj)
        md = obj.metadata
        if not md.resource_version:
            raise ValueError("update needs metadata.resourceVersion (read the object first)")
        key = object_key(kind, md.name or "", md.namespace)
        try:
            rev = await self.cas_raw(key, self.encode(obj), int(md.resource_version))
        except Conflict:
            if await self.get_raw(key) is None:
                raise NotFound(key) from None
            raise
        md.resource_version = str(rev)
        return obj

    async def put(self, obj: T) -> T:
        """Create or replace unconditionally (for `apply`); keeps uid and creation time."""
        kind = type(obj)
        md = obj.metadata
        key = object_key(kind, md.name or "", md.namespace)
        for _ in range(10):
            cur = await self.get_raw(key)
            if cur is None:
                try:
                    return await self.create(obj)
                except AlreadyExists:
                    continue
            old = self.decode(kind, cur)
            md.uid = old.metadata.uid
            md.creation_timestamp = old.metadata.creation_timestamp
            spec_changed = getattr(old, "spec", None) != getattr(obj, "spec", None)
            md.generation = (old.metadata.generation or 1) + (1 if spec_changed else 0)
            if "status" in type(obj).model_fields and "status" not in obj.model_fields_set:
                obj.status = old.status  # type: ignore[attr-defined]
            md.resource_version = str(cur.mod_revision)
            try:
                return await self.update(obj)
            except Conflict:
                continue
        raise Conflict(key)

    async def modify(
        self,
        kind: type[T],
        name: str,
        namespace: str | None,
        change: Callable[[T], T | None],
        retries: int = 20,
    ) -> T:
        """Read, apply `change`, CAS; retried on conflict. `change` may return None to skip."""
        for _ in range(retries):
            obj = await self.get(kind, name, namespace)
            if obj is None:
                raise NotFound(object_key(kind, name, namespace))
            new = change(obj)
            if new is None:
                return obj
            try:
                return await self.update(new)
            except Conflict:
                await asyncio.sleep(0.005)
        raise Conflict(object_key(kind, name, namespace))

    async def delete(
        self,
        kind: type[T],
        name: str,
        namespace: str | None = None,
        resource_version: str | None = None,
    ) -> bool:
        key = object_key(kind, name, namespace)
        return await self.delete_raw(key, int(resource_version) if resource_version else None)

    async def watch(
        self,
        kind: type[T],
        namespace: str | None = None,
        start_revision: int | None = None,
        known: dict[str, int] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Typed events from `start_revision`; see watch_prefix_raw for resumption."""
        prefix = kind_prefix(kind, namespace)
        if start_revision is None:
            start_revision = await self.revision() + 1
        async for ev in self.watch_prefix_raw(prefix, start_revision, known):
            if ev.type == "DELETED":
                # Always `ns/name` (or `name`), whether or not the watch is namespaced.
                yield WatchEvent("DELETED", ev.key.removeprefix(kind_prefix(kind)), ev.revision)
            else:
                try:
                    obj = self.decode(kind, ev)
                except ValueError as e:
                    log.error("skipping undecodable %s at %s: %s", kind.KIND, ev.key, e)
                    continue
                yield WatchEvent(ev.type, obj, ev.revision)

    async def list_and_watch(
        self, kind: type[T], namespace: str | None = None
    ) -> AsyncIterator[WatchEvent]:
        """ADDED for everything present, then every later change: the informer pattern.

        DELETED events carry the key name (`ns/name` or `name`) as `object`.
        """
        objs, rev = await self.list(kind, namespace)
        known = {
            object_key(kind, o.name, o.namespace): int(o.metadata.resource_version or 0)
            for o in objs
        }
        for o in objs:
            yield WatchEvent("ADDED", o, int(o.metadata.resource_version or 0))
        async for ev in self.watch(kind, namespace, rev + 1, known):
            yield ev
