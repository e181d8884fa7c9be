"""A bounded-frequency runner: syncs when asked, but not too often and not too rarely.

kube-proxy's BoundedFrequencyRunner (pkg/util/async), for asyncio:

- `run_soon()` asks for a sync; requests that arrive while one is pending or
  running coalesce into one run.
- Two runs start at least `min_interval` apart.
- A full run happens at least every `max_interval` (counted from the last full
  run: requested runs may be partial and do not repair everything).
- A failed run is retried after a backoff that doubles from `retry_initial` up
  to `retry_max`; the retry is a full run, since what the failed run had taken
  to do (e.g. a change tracker's pending changes) is gone.

The sync function is told which kind of run it is: `sync(full)` is called with
True for a periodic run, a retry, or when a caller asked `run_soon(full=True)`;
False when only partial requests are pending. `clock` and `sleep` are
injectable, so tests drive the runner with a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Sync = Callable[[bool], Awaitable[None]]


class BoundedFrequencyRunner:
    def __init__(
        self,
        name: str,
        sync: Sync,
        min_interval: float,
        max_interval: float,
        *,
        retry_initial: float = 1.0,
        retry_max: float | None = None,
        run_at_start: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if min_interval < 0 or max_interval <= 0 or min_interval > max_interval:
            raise ValueError(
                f"{name}: need 0 <= min_interval <= max_interval and max_interval > 0 "
                f"(got {min_interval:g}, {max_interval:g})"
            )
        self.name = name
        self._sync = sync
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.retry_initial = retry_initial
        self.retry_max = max_interval if retry_max is None else retry_max
        self._clock = clock
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._pending = run_at_start
        self._pending_full = run_at_start
        self._retry_at: float | None = None
        self._last_start = -math.inf
        self._last_full: float | None = None
        # Counters (plain attributes: the daemon skeleton turns them into metrics).
        self.requests = 0
        self.runs = 0
        self.full_runs = 0
        self.failures = 0
        self.consecutive_failures = 0

    def run_soon(self, full: bool = False) -> None:
        """Ask for a sync (a full one if `full`); returns at once."""
        self.requests += 1
        self._pending = True
        self._pending_full = self._pending_full or full
        self._wake.set()

    @property
    def full_pending(self) -> bool:
        """A full run is already due (requested or a retry)."""
        return self._pending_full or self._retry_at is not None

    def _due(self, now: float) -> float:
        assert self._last_full is not None
        if self._retry_at is not None:
            want = self._retry_at
        elif self._pending:
            want = now
        else:
            want = self._last_full + self.max_interval
        return max(want, self._last_start + self.min_interval)

    async def _wait(self, delay: float) -> None:
        """Sleep `delay`, or less if run_soon() is called meanwhile."""
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def run(self) -> None:
        """Run syncs until cancelled."""
        self._last_full = self._clock()
        while True:
            now = self._clock()
            due = self._due(now)
            if now < due:
                await self._wait(due - now)
                continue
            full = (
                self._pending_full
                or self._retry_at is not None
                or now >= self._last_full + self.max_interval
            )
            self._pending = self._pending_full = False
            self._retry_at = None
            self._last_start = now
            self.runs += 1
            self.full_runs += full
            try:
                await self._sync(full)
            except Exception:
                self.failures += 1
                self.consecutive_failures += 1
                backoff = min(
                    self.retry_initial * 2 ** (self.consecutive_failures - 1), self.retry_max
                )
                log.exception(
                    "%s: %s sync failed; retrying with a full one in %.1fs",
                    self.name,
                    "full" if full else "partial",
                    backoff,
                )
                self._retry_at = self._clock() + backoff
                continue
            self.consecutive_failures = 0
            if full:
                self._last_full = now
