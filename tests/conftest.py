"""Shared fixtures: a throwaway etcd per test session, a clean key space per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd


@pytest.fixture(scope="session")
def etcd() -> Iterator[LocalEtcd]:
    """A real etcd on a free loopback port, removed with its data afterwards."""
    tmp = tempfile.mkdtemp(prefix="corral-test-etcd-")
    server = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


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
