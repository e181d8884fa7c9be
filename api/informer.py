"""Shared informers: one list-then-watch per kind per process, a cache, indexes, handlers.

Every reader of objects in a process goes through one `InformerFactory(store)`:

    informers = InformerFactory(store)
    pods = informers.informer(Pod)            # the same Informer for every caller
    pods.add_index(BY_NODE, by_node)
    reg = pods.on_change(handler)             # handler(old, new); None for add/delete
    informers.start()
    await pods.wait_synced()
    pods.by_index(BY_NODE, "node-1")
    ...
    await informers.stop()

Records that are not Kubernetes objects (subnet leases) use `informers.raw(prefix,
decode)`: the same informer, keyed by the full etcd key.

Like client-go's shared informers, the cache (and its indexes) is updated as each
event arrives, and handlers are told afterwards, each from its own queue and task:
a slow handler delays only itself, never the watch or the other handlers, and
loses nothing. A handler may be a plain function or a coroutine function; an
exception it raises is logged and counted, and the next event comes as usual.

The watch is the store's `watch_prefix_raw`, which survives compaction (it
re-lists and emits the difference) and reconnects; anything else that breaks the
watch makes the informer re-list and emit the difference against its cache, so
the cache, its indexes and the handlers' view stay exact through all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from corral.api.objects import Pod, TypedObject
from corral.api.store import KV, RawEvent, Store, WatchStats, kind_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=TypedObject)

Handler = Callable[[Any, Any], Awaitable[None] | None]
IndexFunc = Callable[[Any], Iterable[str]]
Decode = Callable[[bytes], Any]  # value -> object, or None if it cannot be read

# ------------------------------------------------------------------ ready indexes

BY_NODE = "node"
BY_OWNER = "owner"
BY_POD_IP = "podIP"
BY_NAMESPACE = "namespace"
BY_LABEL = "label"


def by_node(pod: Pod) -> list[str]:
    """The node a pod is bound to (`spec.nodeName`); none while it is unscheduled."""
    return [pod.spec.node_name] if pod.spec.node_name else []


def by_owner(obj: TypedObject) -> list[str]:
    """The uids of the objects that own this one (every ownerReference)."""
    return [r.uid for r in obj.metadata.owner_references if r.uid]


def by_pod_ip(pod: Pod) -> list[str]:
    """Every IP of a pod (`status.podIP` and `status.podIPs`), for reverse lookups."""
    ips = [pod.status.pod_ip] if pod.status.pod_ip else []
    ips += [p.ip for p in pod.status.pod_ips if p.ip and p.ip not in ips]
    return ips


def by_namespace(obj: TypedObject) -> list[str]:
    return [obj.namespace] if obj.namespace else []


def label_pair(namespace: str | None, key: str, value: str) -> str:
    """The BY_LABEL index value of one label: `ns/key=value`."""
    return f"{namespace or ''}/{key}={value}"


def by_label(obj: TypedObject) -> list[str]:
    """Every label of an object with its namespace (`ns/key=value`): what selectors use."""
    return [label_pair(obj.namespace, k, v) for k, v in obj.metadata.labels.items()]


def selected(
    informer: Informer[K], namespace: str | None, selector: Mapping[str, str] | None
) -> list[K]:
    """Objects in `namespace` whose labels carry every pair of `selector` (Service-style:
    an empty selector selects nothing), sorted by key. Uses the BY_LABEL index (added
    if missing): only the objects with the selector's rarest pair are looked at."""
    if not selector or not namespace:
        return []
    informer.add_index(BY_LABEL, by_label)
    rarest = min(
        (label_pair(namespace, k, v) for k, v in selector.items()),
        key=lambda pair: informer.index_size(BY_LABEL, pair),
    )
    candidates = informer.index_keys(BY_LABEL, rarest)
    out = []
    for key in sorted(candidates):
        o = informer.cache.get(key)
        if o is not None and all(o.metadata.labels.get(k) == v for k, v in selector.items()):
            out.append(o)
    return out


# ------------------------------------------------------------------ handlers

_SYNCED = object()  # queued to a handler after the initial list: it has seen everything


class Registration:
    """One handler on one informer: its queue, its task and its counters."""

    def __init__(self, informer: Informer[Any], handler: Handler) -> None:
        self.informer = informer
        self.handler = handler
        self.name = getattr(handler, "__qualname__", repr(handler))
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.synced = asyncio.Event()  # the handler has processed the initial list
        self.handled = 0
        self.errors = 0
        self.task: asyncio.Task | None = None

    @property
    def has_synced(self) -> bool:
        return self.synced.is_set()

    async def wait_synced(self) -> None:
        await self.synced.wait()

    def _start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(
                self._loop(), name=f"informer-{self.informer.name}-{self.name}"
            )

    async def _loop(self) -> None:
        while True:
            item = await self.queue.get()
            if item is _SYNCED:
                self.synced.set()
                continue
            old, new = item
            try:
                result = self.handler(old, new)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a handler bug must not stop the others or the watch
                self.errors += 1
                log.exception("%s handler %s failed", self.informer.name, self.name)
            self.handled += 1

    def remove(self) -> None:
        """Stop delivering to this handler."""
        with contextlib.suppress(ValueError):
            self.informer._registrations.remove(self)
        if self.task is not None:
            self.task.cancel()


# ------------------------------------------------------------------ the informer


class Informer(Generic[T]):
    """Every record under one prefix, by key, kept current by one list-then-watch.

    Keys are `ns/name` (or `name`) for typed kinds, the etcd key for raw records.
    Objects in the cache are shared by every consumer: never change them in place.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        decode: Callable[[str, bytes, int], T | None],
        key_of: Callable[[str], str],
        name: str,
        kind: type[TypedObject] | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.name = name
        self.kind = kind
        self._decode = decode
        self._key_of = key_of
        self.raw_decode: Decode | None = None  # set for raw informers (see InformerFactory.raw)
        self.cache: dict[str, T] = {}
        self.synced = asyncio.Event()
        self._registrations: list[Registration] = []
        self._indexers: dict[str, IndexFunc] = {}
        self._indexes: dict[str, dict[str, set[str]]] = {}
        self._known: dict[str, int] = {}  # etcd key -> mod revision (what the watch resumes on)
        self._rev = 0  # the revision the watch resumes at; 0: list first
        self._running = False
        # Counters (plain attributes: the daemon skeleton turns them into metrics).
        self.watch_stats = WatchStats()  # compaction re-lists and reconnects inside the watch
        self.lists = 0  # full lists (the first one, and one after every restart)
        self.restarts = 0  # the watch failed in a way the store did not absorb
        self.events = 0  # changes applied to the cache
        self.undecodable = 0

    # ---------------------------------------------------------------- reading

    @property
    def has_synced(self) -> bool:
        """The first list is in the cache."""
        return self.synced.is_set()

    async def wait_synced(self) -> None:
        await self.synced.wait()

    def get(self, name: str, namespace: str | None = None) -> T | None:
        if self.kind is not None and self.kind.NAMESPACED:
            return self.cache.get(f"{namespace}/{name}")
        return self.cache.get(name)

    def values(self) -> list[T]:
        return list(self.cache.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self.cache.items())

    @property
    def queue_depth(self) -> int:
        """Events waiting for handlers, summed over the handlers."""
        return sum(r.queue.qsize() for r in self._registrations)

    @property
    def handled(self) -> int:
        return sum(r.handled for r in self._registrations)

    @property
    def handler_errors(self) -> int:
        return sum(r.errors for r in self._registrations)

    # ---------------------------------------------------------------- indexes

    def add_index(self, name: str, fn: IndexFunc) -> None:
        """Index the cache by `fn(obj) -> [values]`; consumers share it by name.

        Adding the same function under the same name again is a no-op (two
        consumers may both ask for it); another function under a taken name is
        a mistake. Indexes may be added at any time: the cache is indexed at once.
        """
        have = self._indexers.get(name)
        if have is not None:
            if have is not fn:
                raise ValueError(f"{self.name}: index {name!r} exists with another function")
            return
        self._indexers[name] = fn
        self._indexes[name] = {}
        for key, obj in self.cache.items():
            self._index_one(name, key, None, obj)

    def by_index(self, name: str, value: str) -> list[T]:
        keys = self.index_keys(name, value)
        return [self.cache[k] for k in sorted(keys) if k in self.cache]

    def index_keys(self, name: str, value: str) -> set[str]:
        try:
            index = self._indexes[name]
        except KeyError:
            raise KeyError(f"{self.name} has no index {name!r}; add_index it first") from None
        return set(index.get(value, ()))

    def index_size(self, name: str, value: str) -> int:
        """How many objects the index holds under `value` (no copy)."""
        return len(self._indexes[name].get(value, ()))

    def revision_of(self, etcd_key: str) -> int | None:
        """The mod revision of the record at `etcd_key` that the cache reflects."""
        return self._known.get(etcd_key)

    def index_values(self, name: str) -> list[str]:
        """Every value the index holds at least one object under."""
        return sorted(v for v, keys in self._indexes[name].items() if keys)

    def _index_one(self, name: str, key: str, old: T | None, new: T | None) -> None:
        fn, index = self._indexers[name], self._indexes[name]
        before = set(self._values_of(fn, old)) if old is not None else set()
        after = set(self._values_of(fn, new)) if new is not None else set()
        for v in before - after:
            keys = index.get(v)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[v]
        for v in after - before:
            index.setdefault(v, set()).add(key)

    def _values_of(self, fn: IndexFunc, obj: T) -> Iterable[str]:
        try:
            return list(fn(obj))
        except Exception:
            log.exception("%s: index function %r failed", self.name, fn)
            return []

    # ---------------------------------------------------------------- handlers

    def on_change(self, handler: Handler) -> Registration:
        """`handler(old, new)`: old is None on add, new is None on delete.

        A handler added after the first list gets an add for everything cached,
        as client-go's do.
        """
        reg = Registration(self, handler)
        self._registrations.append(reg)
        if self.has_synced:
            for obj in self.cache.values():
                reg.queue.put_nowait((None, obj))
            reg.queue.put_nowait(_SYNCED)
        if self._running:
            reg._start()
        return reg

    def _notify(self, old: T | None, new: T | None) -> None:
        for reg in self._registrations:
            reg.queue.put_nowait((old, new))

    # ---------------------------------------------------------------- the watch

    def _set(self, key: str, new: T | None) -> None:
        """Put `new` (None: remove) under `key`: cache, indexes, then the handlers."""
        old = self.cache.get(key)
        if new is None:
            if old is None:
                return
            del self.cache[key]
        else:
            self.cache[key] = new
        for name in self._indexers:
            self._index_one(name, key, old, new)
        self.events += 1
        self._notify(old, new)

    def _apply(self, ev: RawEvent) -> None:
        key = self._key_of(ev.key)
        if ev.type == "DELETED":
            self._set(key, None)
            return
        assert ev.value is not None
        try:
            obj = self._decode(ev.key, ev.value, ev.revision)
        except ValueError:
            obj = None
        if obj is None:
            self.undecodable += 1
            log.error("%s: skipping undecodable record at %s", self.name, ev.key)
            return
        self._set(key, obj)

    async def _list(self) -> int:
        """List and turn the cache into what is stored; the revision to watch from."""
        kvs, rev = await self.store.list_raw(self.prefix)
        self.lists += 1
        current: dict[str, KV] = {kv.key: kv for kv in kvs}
        for key in sorted(set(self._known) - set(current)):
            del self._known[key]
            self._apply(RawEvent("DELETED", key, None, rev))
        for key, kv in current.items():
            if self._known.get(key) != kv.mod_revision:
                typ = "MODIFIED" if key in self._known else "ADDED"
                self._known[key] = kv.mod_revision
                self._apply(RawEvent(typ, key, kv.value, kv.mod_revision))
        return rev + 1

    def _mark_synced(self) -> None:
        if not self.synced.is_set():
            self.synced.set()
            for reg in self._registrations:
                reg.queue.put_nowait(_SYNCED)

    async def run(self) -> None:
        """List, then watch, until cancelled.

        Run again after a stop, it resumes from the last revision it saw (the
        store re-lists if that was compacted meanwhile); a failure it did not
        expect makes it re-list after a pause.
        """
        self._running = True
        for reg in self._registrations:
            reg._start()
        backoff = 0.2
        try:
            while True:
                try:
                    if not self.has_synced or self._rev == 0:
                        self._rev = await self._list()
                        self._mark_synced()
                    async for ev in self.store.watch_prefix_raw(
                        self.prefix, self._rev, self._known, self.watch_stats
                    ):
                        self._rev = max(self._rev, ev.revision + 1)
                        self._apply(ev)
                        backoff = 0.2
                except Exception as e:  # etcd away at list time, or a stream we did not expect
                    self.restarts += 1
                    self._rev = 0  # re-list: the watch may have lost its place
                    log.warning(
                        "%s informer: %s: %s; re-listing in %.1fs",
                        self.name,
                        type(e).__name__,
                        e,
                        backoff,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            self._running = False

    async def _stop_handlers(self) -> None:
        await _cancel([r.task for r in self._registrations if r.task is not None])
        for r in self._registrations:
            r.task = None

    def stats(self) -> dict[str, int]:
        """The counters, by name (what a metrics exporter reads)."""
        return {
            "objects": len(self.cache),
            "lists": self.lists,
            "relists": self.watch_stats.relists,
            "reconnects": self.watch_stats.reconnects,
            "restarts": self.restarts,
            "events": self.events,
            "undecodable": self.undecodable,
            "handled": self.handled,
            "handler_errors": self.handler_errors,
            "queue_depth": self.queue_depth,
        }


async def _cancel(tasks: list[asyncio.Task], timeout: float = 10.0) -> None:
    """Cancel `tasks` and wait for them, cancelling again while they linger: Python
    3.11's asyncio.wait_for (inside the etcd client) can swallow one cancellation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    if pending:
        log.warning("%d informer task(s) did not stop within %.0fs", len(pending), timeout)
    for t in tasks:  # collect what they raised so asyncio does not warn
        if t.done() and not t.cancelled():
            t.exception()


# ------------------------------------------------------------------ the factory


def _typed_decoder(kind: type[K]) -> Callable[[str, bytes, int], K | None]:
    def decode(key: str, value: bytes, revision: int) -> K | None:
        return Store.decode(kind, KV(key, value, revision, 0))

    return decode


class InformerFactory:
    """One informer per kind (or raw prefix) for the whole process.

    `start()` runs every informer made so far, and any made later at once;
    `stop()` cancels them and their handlers. `run()` is start, wait, stop.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._informers: dict[str, Informer[Any]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._started = False

    def informer(self, kind: type[K]) -> Informer[K]:
        prefix = kind_prefix(kind)
        inf = self._informers.get(prefix)
        if inf is None:
            inf = Informer(
                self.store,
                prefix,
                _typed_decoder(kind),
                lambda key: key.removeprefix(prefix),
                kind.KIND,
                kind,
            )
            self._add(prefix, inf)
        return inf

    def raw(self, prefix: str, decode: Decode) -> Informer[Any]:
        """Records under `prefix` that are not typed objects, decoded by `decode(value)`
        (None: unreadable, skipped), keyed by their full etcd key."""
        inf = self._informers.get(prefix)
        if inf is None:
            inf = Informer(
                self.store,
                prefix,
                lambda key, value, rev: decode(value),
                lambda key: key,
                prefix,
            )
            inf.raw_decode = decode
            self._add(prefix, inf)
        elif inf.raw_decode is not decode:
            raise ValueError(f"an informer for {prefix} exists with another decoder")
        return inf

    def _add(self, prefix: str, inf: Informer[Any]) -> None:
        self._informers[prefix] = inf
        if self._started:
            self._run(prefix, inf)

    def _run(self, prefix: str, inf: Informer[Any]) -> None:
        if prefix not in self._tasks:
            self._tasks[prefix] = asyncio.create_task(inf.run(), name=f"informer-{inf.name}")

    @property
    def informers(self) -> list[Informer[Any]]:
        return list(self._informers.values())

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Run every informer (idempotent: each consumer may call it)."""
        self._started = True
        for prefix, inf in self._informers.items():
            self._run(prefix, inf)

    async def wait_synced(self) -> None:
        """Every informer made so far has its first list."""
        await asyncio.gather(*(inf.wait_synced() for inf in self.informers))

    @property
    def has_synced(self) -> bool:
        return all(inf.has_synced for inf in self.informers)

    def stats(self) -> dict[str, dict[str, int]]:
        """Every informer's counters, by informer name (kind, or prefix for raw ones)."""
        return {inf.name: inf.stats() for inf in self.informers}

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        self._started = False
        await _cancel(tasks)
        for inf in self.informers:
            await inf._stop_handlers()

    async def run(self) -> None:
        """start(), then wait until cancelled; stop() on the way out."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()


@contextlib.asynccontextmanager
async def started(factory: InformerFactory, stop: bool = True) -> AsyncIterator[InformerFactory]:
    """Start `factory` for the block; stop it afterwards only if `stop` (i.e. if it is
    ours: a factory shared by a whole process is stopped by whoever made it)."""
    factory.start()
    try:
        yield factory
    finally:
        if stop:
            await factory.stop()
