"""Shared fixtures: a throwaway etcd per test session, a clean key space per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd


@contextlib.contextmanager
def running_etcd(what: str = "etcd", **options: Any) -> Iterator[LocalEtcd]:
    """A real etcd of its own on free loopback ports (`options` go to LocalEtcd), stopped
    (thawed first, if a test froze it) and removed with its data afterwards."""
    tmp = tempfile.mkdtemp(prefix=f"corral-test-{what}-")
    server = LocalEtcd(
        data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"), **options
    )
    server.start()
    try:
        yield server
    finally:
        if server.record is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.record.pid, signal.SIGCONT)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd() -> Iterator[LocalEtcd]:
    """A real etcd on a free loopback port, shared by the session."""
    with running_etcd() as server:
        yield server


def on_store(url: str, fn: Callable[[Store], Any]) -> Any:
    """Run `fn(store)` on a fresh connection to `url`, from synchronous test code."""

    async def go() -> Any:
        async with Store(url) as s:
            return await fn(s)

    return asyncio.run(go())


@pytest.fixture
def etcd_url(etcd: LocalEtcd) -> Iterator[str]:
    """The session etcd's URL, with an empty /corral key space before and after."""

    async def wipe(s: Store) -> None:
        await s.delete_prefix_raw("/corral/")

    on_store(etcd.url, wipe)
    yield etcd.url
    on_store(etcd.url, wipe)


@pytest.fixture
async def store(etcd: LocalEtcd) -> AsyncIterator[Store]:
    """A connected Store on an empty /corral key space."""
    s = Store(etcd.url)
    await s.connect()
    await s.delete_prefix_raw("/corral/")
    try:
        yield s
    finally:
        await s.delete_prefix_raw("/corral/")
        await s.close()
