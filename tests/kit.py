"""The test kit: waiting for a condition, and throwaway network namespaces.

Import it as a package from any test folder (`from tests.kit import wait_for`; the
root conftest.py puts the checkout on sys.path).

A deadline here is not a timing assertion: it only bounds how long a broken test
hangs, so make it generous (a loaded 2-core machine running several pytest workers
is slow) and never assert on how fast something happened. On time-out the error
says what was awaited and what the condition last returned or raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from corral.node import netns


def _timed_out(what: str, timeout: float, last: Any, error: BaseException | None) -> AssertionError:
    seen = f"last raised {error!r}" if error is not None else f"last returned {last!r}"
    if len(seen) > 500:
        seen = seen[:500] + "..."
    return AssertionError(f"timed out after {timeout:.0f}s waiting for {what} ({seen})")


def wait_for(
    cond: Callable[[], Any],
    what: str = "condition",
    timeout: float = 30.0,
    interval: float = 0.05,
    errors: tuple[type[Exception], ...] = (),
) -> Any:
    """Call `cond` until it returns something truthy, and return that.

    An exception of a type in `errors` counts as "not yet" (an AssertionError is always
    raised at once: a check that fails is not retried)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last, error = cond(), None
            if last:
                return last
        except AssertionError:
            raise
        except errors as e:
            error = e
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last, error)
        time.sleep(interval)


async def eventually(
    check: Callable[[], Any],
    what: str = "condition",
    timeout: float = 30.0,
    interval: float = 0.05,
    errors: tuple[type[Exception], ...] = (),
) -> Any:
    """The asyncio `wait_for`: `check` may be a plain function or return an awaitable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last, error = check(), None
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except AssertionError:
            raise
        except errors as e:
            error = e
        if loop.time() >= deadline:
            raise _timed_out(what, timeout, last, error)
        await asyncio.sleep(interval)


def unique_name(prefix: str, limit: int = 15) -> str:
    """`prefix-<random hex>` within `limit` characters (15 fits a kernel interface
    name): unique across the suite's parallel workers and other users of the host."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    if len(name) > limit:
        raise ValueError(f"{name!r} is longer than {limit} characters: shorten {prefix!r}")
    return name


@contextlib.contextmanager
def scratch_netns(prefix: str = "scratch") -> Iterator[str]:
    """A named network namespace of the caller's own (`ip netns` name), removed after."""
    name = unique_name(prefix, limit=64)
    netns.add(name)
    try:
        yield name
    finally:
        netns.remove(name)
