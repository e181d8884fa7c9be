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
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

import aetcd
import aetcd.exceptions
import aetcd.utils
import grpc

from corral.api import metrics
from corral.api.objects import TypedObject

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


class Compacted(StoreError):
    """The revision asked for was compacted away (an API server answers 410 Expired)."""

    def __init__(self, revision: int, compacted: int = 0) -> None:
        super().__init__(f"revision {revision} was compacted (now at {compacted or '?'})")
        self.revision, self.compacted = revision, compacted


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
    """`http://h:p,https://h2:p2` (or a list) to [(host, port)]; ValueError names the bad one."""
    return [(host, port) for host, port, _ in _parse(urls)]


def endpoints_use_tls(urls: str | list[str]) -> bool:
    """True when the endpoints are https://; ValueError when http and https are mixed."""
    schemes = {secure for _, _, secure in _parse(urls)}
    if len(schemes) > 1:
        raise ValueError("etcd endpoints mix http:// and https://; use one scheme for all")
    return schemes == {True}


def _parse(urls: str | list[str]) -> list[tuple[str, int, bool]]:
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = []
    for raw in (u.strip() for u in items):
        if not raw:
            continue
        u = urlparse(raw if "://" in raw else f"http://{raw}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"etcd endpoint {raw!r} is not a URL like https://127.0.0.1:2379")
        try:
            port = u.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {raw!r} has an invalid port") from None
        out.append((u.hostname, port, u.scheme == "https"))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


@dataclass(frozen=True)
class TLSFiles:
    """Mutual TLS to etcd: the CA that signed etcd's certificate, our certificate and key
    (flannel's --etcd-cafile/--etcd-certfile/--etcd-keyfile)."""

    ca: str
    cert: str
    key: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate chain, key) PEM bytes; ValueError names an unreadable file."""
        out = []
        for flag, path in (("cafile", self.ca), ("certfile", self.cert), ("keyfile", self.key)):
            try:
                with open(path, "rb") as f:
                    out.append(f.read())
            except OSError as e:
                raise ValueError(f"--etcd-{flag} {path}: {e.strerror}") from None
        return out[0], out[1], out[2]

    def ssl_context(self) -> ssl.SSLContext:
        """The same identity for plain HTTPS (etcd's /health)."""
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


class _Client(aetcd.Client):
    """aetcd's client over a TLS channel when given credentials.

    aetcd 1.0's `connect()` opens only insecure channels; this one builds the same
    stubs on `grpc.aio.secure_channel`. Everything else is aetcd's.
    """

    def __init__(
        self, *args: Any, credentials: grpc.ChannelCredentials | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            return await super().connect()
        if self._connected.is_set():
            return
        from aetcd import rpc, watcher

        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(target, self._credentials, options=self._options.items())
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


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
class ChangeEvent:
    """One etcd change with the value before it (a watch with prev_kv), for a consumer
    that must see DELETED with the last state or selector transitions."""

    type: Literal["PUT", "DELETE"]
    key: str
    value: bytes | None
    prev_value: bytes | None
    revision: int
    create_revision: int


@dataclass
class WatchStats:
    """What a long-lived watch went through, for whoever reports on it (metrics, debug)."""

    relists: int = 0  # its revision was compacted away: re-listed and emitted the difference
    reconnects: int = 0  # the stream broke (etcd away, failover) and was reopened


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


# gRPC keepalive: a frozen or vanished etcd is noticed within ~15 s even on an idle
# watch (etcd refuses pings more often than every 5 s).
KEEPALIVE = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
}
# A list of 10,000 Services is ~6 MB and 30,000 pods far more: gRPC's default 4 MiB
# receive limit would refuse them. etcd bounds what it sends (--max-send-bytes,
# unlimited by default); the client takes up to 1 GiB.
CHANNEL_OPTIONS = {**KEEPALIVE, "grpc.max_receive_message_length": 1 << 30}
# What etcd says when it cannot serve a request now (no quorum, no leader, overloaded):
# the same to a caller as a member that does not answer.
_UNAVAILABLE_MESSAGES = (
    "deadline exceeded",
    "request timed out",
    "no leader",
    "leader changed",
    "too many requests",
    "not capable",
)


def _unavailable(e: Exception) -> bool:
    if isinstance(e, _CONN_ERRORS):
        return True
    text = str(e).lower()
    return any(m in text for m in _UNAVAILABLE_MESSAGES)


# etcd's defaults: at most 128 operations per transaction (--max-txn-ops; compares,
# success and failure ops are each counted) and 1.5 MiB per request
# (--max-request-bytes). Batches stay under both, with room for keys and framing.
MAX_TXN_OPS = 128
MAX_TXN_BYTES = 1024 * 1024
WATCH_CANCEL_TIMEOUT = 2.0  # seconds to wait for etcd to confirm a watch cancel

X = TypeVar("X")


def batched(
    items: Iterable[X],
    size: Callable[[X], int],
    ops: Callable[[X], int] = lambda _: 1,
    max_ops: int = MAX_TXN_OPS,
    max_bytes: int = MAX_TXN_BYTES,
) -> list[list[X]]:
    """`items` in order, cut into runs of at most `max_ops` operations (`ops(item)` each)
    and `max_bytes` (`size(item)` each): one etcd transaction per run. An item bigger
    than `max_bytes` on its own gets a run of its own."""
    out: list[list[X]] = []
    cur: list[X] = []
    n = nbytes = 0
    for item in items:
        k, b = ops(item), size(item)
        if cur and (n + k > max_ops or nbytes + b > max_bytes):
            out.append(cur)
            cur, n, nbytes = [], 0, 0
        cur.append(item)
        n += k
        nbytes += b
    if cur:
        out.append(cur)
    return out


RETIRE_SECONDS = 30.0  # a replaced client is closed this long after its replacement
_WATCH_ERRORS = (*_CONN_ERRORS, aetcd.exceptions.WatchTimeoutError)


class Store:
    """An etcd client over one or more endpoints, failing over between them."""

    def __init__(
        self, endpoints: str | list[str], timeout: float = 5.0, tls: TLSFiles | None = None
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if endpoints_use_tls(endpoints) and tls is None:
            raise ValueError(
                "https:// etcd endpoints need a client certificate: give "
                "--etcd-cafile, --etcd-certfile and --etcd-keyfile"
            )
        self.tls = tls
        self._credentials: grpc.ChannelCredentials | None = None
        if tls is not None:
            ca, cert, key = tls.read()
            self._credentials = grpc.ssl_channel_credentials(ca, key, cert)
        self.timeout = timeout
        self._idx = 0
        self._client: aetcd.Client | None = None
        self._gen = 0  # bumped by every connect: which client a failure happened on
        self._retired: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def url(self) -> str:
        host, port = self.endpoints[self._idx]
        return f"{self.scheme}://{host}:{port}"

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
            client = _Client(
                host=host,
                port=port,
                timeout=self.timeout,
                connect_wait_timeout=max(1, int(self.timeout)),
                credentials=self._credentials,
                options=CHANNEL_OPTIONS,
            )
            try:
                await client.connect()
                await asyncio.wait_for(client.status(), self.timeout)
            except (*_CONN_ERRORS, TimeoutError, OSError) as e:
                with contextlib.suppress(Exception):
                    await client.close()
                errors.append(f"{self.scheme}://{host}:{port} ({type(e).__name__})")
                continue
            old, self._client, self._idx = self._client, client, idx
            self._gen += 1
            if old is not None:
                # Calls and watches still on the old client finish or fail on their own
                # and then move here; closing it under them would fail them all at once.
                self._retired.add(asyncio.create_task(self._close_later(old)))
            return
        raise Unavailable("cannot reach etcd at " + ", ".join(errors))

    async def _close_later(self, client: aetcd.Client) -> None:
        try:
            await asyncio.sleep(RETIRE_SECONDS)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
            self._retired.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _reconnect(self, gen: int) -> None:
        """Move to the next endpoint after a failure on client generation `gen`.

        Only the first caller that saw `gen` fail reconnects; the others find a newer
        client and just retry on it, so one reconnect never cancels another's.
        """
        async with self._lock:
            if self._gen != gen:
                return
            self._idx = (self._idx + 1) % len(self.endpoints)
            await self.connect()

    async def close(self) -> None:
        for t in list(self._retired):
            t.cancel()
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def _current(self) -> tuple[aetcd.Client, int]:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    await self.connect()
        assert self._client is not None
        return self._client, self._gen

    async def _call(self, fn: Callable[[aetcd.Client], Any]) -> Any:
        """Run one RPC, reconnecting (to the next endpoint if need be) once on failure."""
        op = sys._getframe(1).f_code.co_name  # the Store method: the metrics' `op` label
        t0 = time.perf_counter()
        try:
            client, gen = await self._current()
            try:
                return await fn(client)
            except aetcd.exceptions.ClientError as e:
                if not _unavailable(e):
                    raise
                await self._reconnect(gen)
            try:
                return await fn(self._client)
            except aetcd.exceptions.ClientError as e:
                if not _unavailable(e):
                    raise
                raise Unavailable(f"etcd at {self.url} did not answer ({e})") from e
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

    async def list_keys(self, prefix: str) -> list[str]:
        """The keys under `prefix`, without their values (a cheap "is anything here")."""
        r = await self._call(lambda c: c.get_prefix(prefix.encode(), keys_only=True))
        return [kv.key.decode() for kv in r]

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

    async def range_raw(
        self, start: str, end: str, limit: int = 0, revision: int = 0
    ) -> tuple[list[KV], int, bool]:
        """The keys in [start, end) in key order, at most `limit` (0: all), read at
        `revision` (0: now): (kvs, the revision read at, whether more keys follow).
        Compacted when `revision` is gone (a paged list resumed too late)."""
        from aetcd import rpc

        req = rpc.RangeRequest(
            key=start.encode(), range_end=end.encode(), limit=limit, revision=revision
        )

        async def run(c: aetcd.Client) -> Any:
            await c.connect()
            try:
                return await c.kvstub.Range(req, timeout=c._timeout, metadata=c.metadata)
            except rpc.AioRpcError as e:
                if "compacted" in (e.details() or ""):
                    raise Compacted(revision) from None
                aetcd.exceptions._handle_exception(e)

        r = await self._call(run)
        kvs = [
            KV(kv.key.decode(), kv.value, kv.mod_revision, kv.create_revision, kv.lease)
            for kv in r.kvs
        ]
        return kvs, r.header.revision, bool(r.more)

    async def changes(self, prefix: str, start_revision: int) -> AsyncIterator[ChangeEvent]:
        """Every change under `prefix` from `start_revision` on, each with its previous
        value, on one etcd watch: no re-list and no reconnect. Compacted when
        `start_revision` is gone; Unavailable when the stream breaks. For a consumer that
        must tell its own client so (an API server's watch: 410 Expired, or the client
        re-watches), unlike `watch_prefix_raw`, which hides both."""
        client, gen = await self._current()
        try:
            w = await client.watch(
                prefix.encode(),
                range_end=aetcd.utils.prefix_range_end(prefix.encode()),
                start_revision=start_revision,
                prev_kv=True,
            )
        except _WATCH_ERRORS as e:
            raise Unavailable(f"etcd watch on {prefix}: {e}") from e
        try:
            async for ev in self._events(w, gen):
                # aetcd wraps an absent prev_kv (a create) as an empty KeyValue
                prev = ev.prev_kv.value if ev.prev_kv is not None and ev.prev_kv.key else None
                if ev.kind == "DELETE":
                    yield ChangeEvent(
                        "DELETE", ev.kv.key.decode(), None, prev, ev.kv.mod_revision, 0
                    )
                else:
                    yield ChangeEvent(
                        "PUT",
                        ev.kv.key.decode(),
                        ev.kv.value,
                        prev,
                        ev.kv.mod_revision,
                        ev.kv.create_revision,
                    )
        except aetcd.exceptions.RevisionCompactedError as e:
            raise Compacted(start_revision, e.compacted_revision) from None
        except _WATCH_ERRORS as e:
            raise Unavailable(f"etcd watch on {prefix}: {e}") from e
        finally:
            await self._cancel_watch(w)

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
        self,
        prefix: str,
        start_revision: int,
        known: dict[str, int] | None = None,
        stats: WatchStats | None = None,
    ) -> AsyncIterator[RawEvent]:
        """Events under `prefix` from `start_revision` on, surviving compaction and reconnects.

        `known` maps key -> mod revision of what the caller already has (from its
        list); it is kept up to date and used to turn a re-list into the exact
        ADDED/MODIFIED/DELETED events the caller missed. `stats`, if given, counts
        the re-lists and reconnects.
        """
        known = {} if known is None else known
        stats = WatchStats() if stats is None else stats
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
                stats.relists += 1
                metrics.WATCH_RESTARTS.labels("compacted").inc()
                missed, next_rev = await self._relist(prefix, known)
                for ev in missed:
                    yield ev
                continue
            except (*_WATCH_ERRORS, Unavailable) as e:
                gen = getattr(e, "corral_gen", self._gen)
                if self._gen != gen:  # the client it was on has been replaced: move at once
                    continue
                log.warning("watch on %s interrupted (%s); retrying in %.1fs", prefix, e, backoff)
                stats.reconnects += 1
                metrics.WATCH_RESTARTS.labels("reconnect").inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                with contextlib.suppress(Unavailable, *_CONN_ERRORS):
                    await self._reconnect(gen)
                continue

    async def _watch_once(
        self, prefix: str, start: int, known: dict[str, int]
    ) -> AsyncIterator[RawEvent]:
        client, gen = await self._current()
        try:
            w = await client.watch(
                prefix.encode(),
                range_end=aetcd.utils.prefix_range_end(prefix.encode()),
                start_revision=start,
            )
        except _WATCH_ERRORS as e:
            e.corral_gen = gen  # type: ignore[attr-defined]
            raise
        try:
            async for ev in self._events(w, gen):
                key = ev.kv.key.decode()
                rev = ev.kv.mod_revision
                if ev.kind == "DELETE":
                    known.pop(key, None)
                    yield RawEvent("DELETED", key, None, rev)
                else:
                    typ = "MODIFIED" if key in known else "ADDED"
                    known[key] = rev
                    yield RawEvent(typ, key, ev.kv.value, rev)
            err = aetcd.exceptions.ConnectionFailedError("watch stream ended")
            err.corral_gen = gen  # type: ignore[attr-defined]
            raise err
        finally:
            await self._cancel_watch(w)

    @staticmethod
    async def _cancel_watch(w: Any) -> None:
        """Tell etcd the watch is over, bounded: grpc may never answer a cancel on a
        stream that is going away (a stopping API server's watch cache hung in it)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.cancel(), WATCH_CANCEL_TIMEOUT)

    @staticmethod
    async def _events(w: Any, gen: int) -> AsyncIterator[Any]:
        """The watch's events; an error says which client generation it came from."""
        try:
            async for ev in w:
                yield ev
        except _WATCH_ERRORS as e:
            e.corral_gen = gen  # type: ignore[attr-defined]
            raise

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
        # Straight from the JSON bytes (pydantic's own parser): ~40% less than
        # json.loads + model_validate, and every list and watch event pays it.
        obj = kind.model_validate_json(kv.value)
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

    @staticmethod
    def prepare_create(obj: TypedObject) -> str:
        """Fill what a new object gets (uid, creationTimestamp, generation, a generated
        name); returns its key."""
        md = obj.metadata
        if not md.name:
            if not md.generate_name:
                raise ValueError("metadata.name or metadata.generateName is required")
            md.name = md.generate_name + secrets.token_hex(3)[:5]
        md.uid = md.uid or str(uuid.uuid4())
        md.creation_timestamp = md.creation_timestamp or now_iso()
        md.generation = md.generation or 1
        md.resource_version = None
        return object_key(type(obj), md.name, md.namespace)

    async def create(self, obj: T) -> T:
        """Create-if-absent. Fills uid, creationTimestamp and a generated name."""
        key = self.prepare_create(obj)
        rev = await self.create_raw(key, self.encode(obj))
        obj.metadata.resource_version = str(rev)
        return obj

    async def commit(
        self,
        creates: Sequence[TypedObject] = (),
        updates: Sequence[TypedObject] = (),
        deletes: Sequence[tuple[type[TypedObject], str, str | None, int]] = (),
        extra_compare: Sequence[tuple] = (),
        extra_ops: Sequence[tuple] = (),
    ) -> int:
        """Several object changes in one etcd transaction: all happen or none does.

        `creates` must not exist yet (filled as `create` does); `updates` are a CAS
        on their `metadata.resourceVersion`; `deletes` are (kind, name, namespace,
        mod revision). `extra_compare`/`extra_ops` are raw `txn` tuples joined to the
        same transaction. Conflict if any condition failed (nothing was written).
        Every written object's resourceVersion becomes the transaction's revision.
        Callers keep a transaction within MAX_TXN_OPS (see `batched`).
        """
        compare: list[tuple] = list(extra_compare)
        success: list[tuple] = list(extra_ops)
        for obj in creates:
            key = self.prepare_create(obj)
            compare.append(("create", key, "==", 0))
            success.append(("put", key, self.encode(obj)))
        for obj in updates:
            md = obj.metadata
            if not md.resource_version:
                raise ValueError("update needs metadata.resourceVersion (read the object first)")
            key = object_key(type(obj), md.name or "", md.namespace)
            compare.append(("mod", key, "==", int(md.resource_version)))
            success.append(("put", key, self.encode(obj)))
        for kind, name, ns, rev in deletes:
            key = object_key(kind, name, ns)
            compare.append(("mod", key, "==", rev))
            success.append(("delete", key))
        if not success:
            return 0
        if len(compare) > MAX_TXN_OPS or len(success) > MAX_TXN_OPS:
            raise ValueError(f"a transaction holds at most {MAX_TXN_OPS} operations")
        ok, rev = await self.txn(compare, success)
        if not ok:
            raise Conflict(f"{len(success)} change(s): one of them changed meanwhile")
        for obj in (*creates, *updates):
            obj.metadata.resource_version = str(rev)
        return rev

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
