"""Shared fixtures: a throwaway etcd per test session, a clean key space per test.

(Test modules import helpers as `tests.<module>` (tests.etcd_helpers, tests.kit, ...),
never from a conftest.)"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd
from corral.node import netns
from corral.runtime import containers
from tests.etcd_helpers import on_store, running_etcd
from tests.kit import scratch_netns


@pytest.fixture(scope="session")
def etcd() -> Iterator[LocalEtcd]:
    """A real etcd on a free loopback port, shared by the session."""
    with running_etcd() as server:
        yield server


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


# ------------------------------------------------------------ container shims


@pytest.fixture(params=["native", "python"])
def shim(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each container shim in turn: the native build (skipped without a compiler), then
    the Python one."""
    if request.param == "native":
        if containers.native_shim() is None:
            pytest.skip("no C compiler: the native shim cannot be built")
    else:
        monkeypatch.setattr(containers, "_native_shim", [None])
    return str(request.param)


@pytest.fixture
def scratch_ns() -> Iterator[str]:
    """A named network namespace of the test's own (`ip netns` name), removed after."""
    with scratch_netns() as name:
        yield name


@pytest.fixture
def pod_dir(tmp_path: Any) -> Iterator[str]:
    """A pod directory with a pinned network namespace at netns/cni-test."""
    ns = os.path.join(tmp_path, "netns", "cni-test")
    netns.create_pinned(ns)
    try:
        yield str(tmp_path)
    finally:
        netns.remove_pinned(ns)
