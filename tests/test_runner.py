"""The bounded-frequency runner on a fake clock: nothing here sleeps for real."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from corral.daemon.runner import BoundedFrequencyRunner


class FakeClock:
    """time() and sleep() for the runner; advance() moves time and wakes sleepers."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, fut))
        await fut

    async def advance(self, dt: float) -> None:
        """Move time on by `dt`, stopping at every sleeper's deadline on the way."""
        end = self.now + dt
        while True:
            await settle()
            live = [(t, f) for t, f in self._sleepers if not f.done()]
            self._sleepers = live
            due = [t for t, _ in live if t <= end]
            if not due:
                break
            self.now = max(self.now, min(due))
            for t, f in live:
                if t <= self.now:
                    f.set_result(None)
        self.now = end
        await settle()


async def settle() -> None:
    """Let every task that can run do so (no real time passes)."""
    for _ in range(50):
        await asyncio.sleep(0)


class Recorder:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, bool]] = []
        self.fail = 0  # fail this many more calls
        self.gate: asyncio.Event | None = None  # block inside the sync until set

    async def __call__(self, full: bool) -> None:
        self.calls.append((self.clock.now, full))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise RuntimeError("sync failed (on purpose)")


@contextlib.asynccontextmanager
async def running(
    min_interval: float = 1.0, max_interval: float = 60.0, **kw: float
) -> AsyncIterator[tuple[BoundedFrequencyRunner, Recorder, FakeClock]]:
    clock = FakeClock()
    rec = Recorder(clock)
    runner = BoundedFrequencyRunner(
        "test", rec, min_interval, max_interval, clock=clock.time, sleep=clock.sleep, **kw
    )
    task = asyncio.create_task(runner.run())
    await settle()
    try:
        yield runner, rec, clock
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def times(rec: Recorder, t0: float = 1000.0) -> list[float]:
    return [t - t0 for t, _ in rec.calls]


async def test_burst_of_requests_coalesces_into_one_run() -> None:
    async with running() as (runner, rec, clock):
        for _ in range(10):
            runner.run_soon()
        await settle()
        assert rec.calls == [(1000.0, False)]
        await clock.advance(5)
        assert len(rec.calls) == 1  # nothing more was asked for


async def test_requests_during_a_run_coalesce_into_one_more() -> None:
    async with running(min_interval=0) as (runner, rec, clock):
        rec.gate = asyncio.Event()
        runner.run_soon()
        await settle()
        assert len(rec.calls) == 1
        for _ in range(5):
            runner.run_soon()
        rec.gate.set()
        await settle()
        assert len(rec.calls) == 2
        await clock.advance(1)
        assert len(rec.calls) == 2


async def test_runs_are_at_least_min_interval_apart() -> None:
    async with running(min_interval=2.0) as (runner, rec, clock):
        runner.run_soon()
        await settle()
        await clock.advance(0.5)
        runner.run_soon()
        await clock.advance(0.5)
        runner.run_soon()  # still inside the 2 s: both wait for one run at t=2
        await clock.advance(0.5)
        assert times(rec) == [0.0]
        await clock.advance(1.0)
        assert times(rec) == [0.0, 2.0]
        await clock.advance(10)
        runner.run_soon()  # long after: runs at once
        await settle()
        assert times(rec) == [0.0, 2.0, 12.5]


async def test_full_run_at_least_every_max_interval() -> None:
    async with running(min_interval=1.0, max_interval=10.0) as (runner, rec, clock):
        await clock.advance(25)
        assert rec.calls == [(1010.0, True), (1020.0, True)]
        # Partial runs do not postpone the periodic full one.
        await clock.advance(3)  # t=28
        runner.run_soon()
        await clock.advance(1)
        assert rec.calls[-1] == (1028.0, False)
        await clock.advance(2)  # t=31
        assert rec.calls[-1] == (1030.0, True)
        assert runner.full_runs == 3 and runner.runs == 4


async def test_full_request_and_partial_request() -> None:
    async with running(min_interval=0.0) as (runner, rec, _clock):
        runner.run_soon()
        runner.run_soon(full=True)
        await settle()
        assert rec.calls == [(1000.0, True)]
        runner.run_soon()
        await settle()
        assert rec.calls[-1] == (1000.0, False)


async def test_failed_run_is_retried_full_with_bounded_backoff() -> None:
    async with running(min_interval=0.0, max_interval=100.0, retry_initial=1.0, retry_max=4.0) as (
        runner,
        rec,
        clock,
    ):
        rec.fail = 5
        runner.run_soon()
        await settle()
        await clock.advance(30)
        # The first attempt, then retries 1, 2, 4, 4 (capped), 4 s after each failure.
        assert times(rec)[:6] == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0]
        assert [full for _, full in rec.calls] == [False] + [True] * 5
        assert runner.failures == 5 and runner.consecutive_failures == 0
        # A success resets the backoff: the next failure waits retry_initial again.
        rec.fail = 1
        runner.run_soon()
        await settle()
        start = clock.now
        await clock.advance(1)
        assert [t - start for t, _ in rec.calls[-2:]] == [0.0, 1.0]


async def test_requests_during_backoff_wait_for_the_retry() -> None:
    async with running(min_interval=0.0, retry_initial=5.0) as (runner, rec, clock):
        rec.fail = 1
        runner.run_soon()
        await settle()
        await clock.advance(1)
        runner.run_soon()
        assert runner.full_pending
        await clock.advance(1)
        assert times(rec) == [0.0]
        await clock.advance(3)
        assert times(rec) == [0.0, 5.0]
        assert rec.calls[-1][1] is True


async def test_run_at_start() -> None:
    async with running(run_at_start=True) as (_runner, rec, _clock):
        assert rec.calls == [(1000.0, True)]


@pytest.mark.parametrize("bad", [(-1.0, 1.0), (2.0, 1.0), (0.0, 0.0)])
def test_bad_intervals_are_refused(bad: tuple[float, float]) -> None:
    sync: Callable = lambda full: asyncio.sleep(0)  # noqa: E731
    with pytest.raises(ValueError, match="min_interval"):
        BoundedFrequencyRunner("x", sync, *bad)
