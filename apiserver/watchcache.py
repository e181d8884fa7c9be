"""The watch cache: one etcd watch per kind, fanned out to every client watch of it
(kube-apiserver's cacher, storage/cacher). 1,000 watchers of pods cost etcd one watch.

Each `KindCache` watches its kind's whole prefix (all namespaces) from the revision it
started at, keeps the last `capacity` events in a ring and hands every event to each
subscriber's queue. A client watch from resourceVersion N is served from the ring when
every event after N is still in it (`oldest <= N`), else it is too old (410 Expired,
as kube-apiserver answers; the client lists again). Lists are not cached: they read
etcd at a revision, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from corral.api.store import ChangeEvent, Compacted, Store, StoreError

log = logging.getLogger(__name__)

CAPACITY = 1024  # events kept per kind
MAX_BACKLOG = 10_000  # a subscriber this far behind is ended (it lists again)
RESTART_DELAY = 0.5


class TooOld(Exception):
    """The subscriber's events are gone (behind the ring, or the cache restarted)."""


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[ChangeEvent | BaseException] = field(default_factory=asyncio.Queue)


class KindCache:
    """One kind's etcd watch, its ring of recent events and its subscribers."""

    def __init__(self, store: Store, prefix: str, capacity: int = CAPACITY) -> None:
        self.store, self.prefix = store, prefix
        self.ring: deque[ChangeEvent] = deque()
        self.capacity = capacity
        self.revision = 0  # the last revision seen (an event's, or the start)
        self.oldest = 0  # every event after this revision is in the ring or to come
        self.subscribers: set[Subscription] = set()
        self.etcd_watches = 0  # etcd watches opened so far (one per (re)start)
        self.started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"watchcache {self.prefix}")

    async def stop(self) -> None:
        """Cancel the watch; again until it ends (grpc's watch stream has been seen to
        swallow a cancellation, and an API server's stop must not hang on it)."""
        self._stopping = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled():
            with contextlib.suppress(BaseException):
                task.result()

    def subscribe(self, after: int) -> tuple[Subscription, list[ChangeEvent]]:
        """A subscription and the ring's events after revision `after`, taken together
        (no await between: nothing is lost or delivered twice). TooOld if the ring no
        longer holds every event after `after`."""
        if after < self.oldest:
            raise TooOld(f"too old resource version: {after} ({self.oldest})")
        sub = Subscription()
        self.subscribers.add(sub)
        return sub, [ev for ev in self.ring if ev.revision > after]

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def _deliver(self, ev: ChangeEvent) -> None:
        self.ring.append(ev)
        if len(self.ring) > self.capacity:
            self.oldest = self.ring.popleft().revision
        self.revision = ev.revision
        for sub in list(self.subscribers):
            if sub.queue.qsize() >= MAX_BACKLOG:
                self._end(sub, TooOld("the watch fell too far behind"))
            else:
                sub.queue.put_nowait(ev)

    def _end(self, sub: Subscription, why: BaseException) -> None:
        self.subscribers.discard(sub)
        sub.queue.put_nowait(why)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                start = await self.store.revision()
                self.ring.clear()
                self.oldest = self.revision = start
                self.started.set()
                self.etcd_watches += 1
                async for ev in self.store.changes(self.prefix, start + 1):
                    self._deliver(ev)
            except asyncio.CancelledError:
                raise
            except (StoreError, Compacted, OSError) as e:
                log.warning("watch cache of %s restarts: %s", self.prefix, e)
            # Events may be lost across a restart: every subscriber lists again.
            for sub in list(self.subscribers):
                self._end(sub, TooOld("the watch cache restarted"))
            await asyncio.sleep(RESTART_DELAY)


class WatchCache:
    """The caches of every kind, started with the server."""

    def __init__(self, store: Store, capacity: int = CAPACITY) -> None:
        self.store, self.capacity = store, capacity
        self.kinds: dict[str, KindCache] = {}

    def kind(self, prefix: str) -> KindCache:
        c = self.kinds.get(prefix)
        if c is None:
            c = self.kinds[prefix] = KindCache(self.store, prefix, self.capacity)
            c.start()
        return c

    async def start(self, prefixes: list[str]) -> None:
        for p in prefixes:
            self.kind(p)
        await asyncio.gather(*(c.started.wait() for c in self.kinds.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.kinds.values()))
        self.kinds.clear()

    def stats(self) -> dict[str, Any]:
        return {
            p: {"revision": c.revision, "events": len(c.ring), "watchers": len(c.subscribers)}
            for p, c in self.kinds.items()
        }
