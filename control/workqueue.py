"""A de-duplicating work queue of object keys and the worker loop that drains it.

A key added while it waits is queued once; a key added while it is being
processed runs again afterwards, so no change is lost and no key is
reconciled by two coroutines at once. That makes several workers on one queue
safe (`run_worker` or `run_batch_worker` started more than once): each holds
different keys.

`run_batch_worker` takes up to `batch` keys at a time, so a controller can
write what they need in a few etcd transactions instead of one per key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self) -> None:
        self._queue: dict[str, None] = {}  # insertion-ordered set
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, key: str) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        self._queue[key] = None
        self._wakeup.set()

    def add_after(self, key: str, delay: float) -> None:
        """Queue `key` in `delay` seconds (an earlier pending timer for it wins)."""
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        when = loop.time() + delay
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self.add(key)

        self._timers[key] = loop.call_later(delay, fire)

    async def get(self) -> str:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        key = next(iter(self._queue))
        del self._queue[key]
        self._active.add(key)
        return key

    async def get_batch(self, limit: int) -> list[str]:
        """Wait for at least one key, then take up to `limit` (each must be `done`)."""
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        keys = []
        for key in self._queue:
            keys.append(key)
            if len(keys) >= limit:
                break
        for key in keys:
            del self._queue[key]
            self._active.add(key)
        return keys

    def done(self, key: str) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()


async def run_worker(
    queue: WorkQueue, reconcile: Callable[[str], Awaitable[float | None]], name: str
) -> None:
    """Drain `queue` forever; `reconcile(key)` may return a delay to look again.

    A failing reconcile is logged and retried with per-key exponential backoff.
    """
    failures: dict[str, int] = {}
    try:
        while True:
            key = await queue.get()
            try:
                again = await reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                n = failures[key] = failures.get(key, 0) + 1
                delay = min(0.05 * 2**n, 10.0)
                log.warning(
                    "%s: %s failed (%s: %s); retrying in %.2fs",
                    name,
                    key,
                    type(e).__name__,
                    e,
                    delay,
                    exc_info=n > 3,
                )
                queue.add_after(key, delay)
            else:
                failures.pop(key, None)
                if again is not None:
                    queue.add_after(key, again)
            finally:
                queue.done(key)
    finally:
        queue.close()


BatchReconcile = Callable[[list[str]], Awaitable[dict[str, float]]]


async def run_batch_worker(
    queue: WorkQueue, reconcile: BatchReconcile, name: str, batch: int = 64
) -> None:
    """Drain `queue` forever, up to `batch` keys per `reconcile(keys)` call.

    `reconcile` returns {key: delay} for keys to look at again. If it raises,
    every key of the batch is retried with per-key exponential backoff.
    """
    failures: dict[str, int] = {}
    try:
        while True:
            keys = await queue.get_batch(batch)
            try:
                again = await reconcile(keys)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                worst = 0
                for key in keys:
                    n = failures[key] = failures.get(key, 0) + 1
                    worst = max(worst, n)
                    queue.add_after(key, min(0.05 * 2**n, 10.0))
                log.warning(
                    "%s: a batch of %d failed (%s: %s); retrying it",
                    name,
                    len(keys),
                    type(e).__name__,
                    e,
                    exc_info=worst > 3,
                )
            else:
                for key in keys:
                    failures.pop(key, None)
                for key, delay in again.items():
                    queue.add_after(key, delay)
            finally:
                for key in keys:
                    queue.done(key)
    finally:
        queue.close()
