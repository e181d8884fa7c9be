"""A local cache of one kind, kept current by list-then-watch, with change handlers.

Controllers read from the cache (cheap, possibly a moment stale) and act
through the store with compare-and-swap, so staleness only costs a retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from corral.api.objects import TypedObject
from corral.api.store import Store, object_key

log = logging.getLogger(__name__)

T = TypeVar("T", bound=TypedObject)
Handler = Callable[[T | None, T | None], None]


class Informer(Generic[T]):
    """Objects of `kind` by key name (`ns/name`, or `name` for cluster-scoped kinds)."""

    def __init__(self, store: Store, kind: type[T]) -> None:
        self.store = store
        self.kind = kind
        self.cache: dict[str, T] = {}
        self.synced = asyncio.Event()
        self._handlers: list[Handler[T]] = []

    def on_change(self, handler: Handler[T]) -> None:
        """`handler(old, new)`: old is None on add, new is None on delete."""
        self._handlers.append(handler)

    def get(self, name: str, namespace: str | None = None) -> T | None:
        return self.cache.get(f"{namespace}/{name}" if self.kind.NAMESPACED else name)

    def values(self) -> list[T]:
        return list(self.cache.values())

    def _emit(self, old: T | None, new: T | None) -> None:
        for h in self._handlers:
            try:
                h(old, new)
            except Exception:  # a handler bug must not stop the watch
                log.exception("%s handler failed", self.kind.KIND)

    async def run(self) -> None:
        objs, rev = await self.store.list(self.kind)
        known: dict[str, int] = {}
        for o in objs:
            known[object_key(self.kind, o.name, o.namespace)] = int(
                o.metadata.resource_version or 0
            )
            self.cache[o.key_name] = o
        for o in objs:
            self._emit(None, o)
        self.synced.set()
        async for ev in self.store.watch(self.kind, None, rev + 1, known):
            if ev.type == "DELETED":
                old = self.cache.pop(ev.object, None)
                if old is not None:
                    self._emit(old, None)
            else:
                new = ev.object
                old = self.cache.get(new.key_name)
                self.cache[new.key_name] = new
                self._emit(old, new)
