"""A small structured-concurrency helper for every daemon (`Supervisor`, `cancel_and_wait`).

Like asyncio.TaskGroup, but without Python 3.11's TaskGroup, which was seen
to hang on cancellation after its children had all finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: list[asyncio.Task], timeout: float = 10.0) -> bool:
    """Cancel `tasks` and wait for them; True if all stopped within `timeout`.

    The cancellation is repeated: Python 3.11's asyncio.wait_for (used inside
    the etcd client) can swallow one that lands as its inner call completes.
    What the stopped tasks raised is collected, so asyncio does not warn of it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = [t for t in tasks if not t.done()]
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.warning(
                "%d task(s) did not stop within %.0fs: %s",
                len(pending),
                timeout,
                ", ".join(t.get_name() for t in pending),
            )
            break
        _, still = await asyncio.wait(pending, timeout=min(1.0, left))
        pending = list(still)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()
    return not pending


class Supervisor:
    """Start child tasks; any child failing fails the whole; leaving cancels them all."""

    def __init__(self, stop_timeout: float = 10.0) -> None:
        self.tasks: list[asyncio.Task] = []
        self.stop_timeout = stop_timeout

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self.tasks, self.stop_timeout)

    def start(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        t = asyncio.create_task(coro, name=name)
        self.tasks.append(t)
        return t

    @staticmethod
    def _check(t: asyncio.Task) -> None:
        if t.cancelled():
            raise RuntimeError(f"task {t.get_name()} was cancelled")
        exc = t.exception()
        if exc is not None:
            raise exc

    async def wait_until(self, event: asyncio.Event) -> None:
        """Wait for `event`, raising at once if a child fails first."""
        waiter = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait([waiter, *self.tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        for t in done:
            if t is not waiter:
                self._check(t)
                if not event.is_set():
                    raise RuntimeError(f"task {t.get_name()} ended early")

    async def wait(self) -> None:
        """Wait for every child; re-raise the first error (children that end cleanly may)."""
        pending = set(self.tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                self._check(t)
