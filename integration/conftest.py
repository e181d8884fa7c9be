"""Whole-cluster fixtures: the session's shared `corral up` cluster (see clusters.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from integration.clusters import NODES, LocalCluster, local_cluster

# The shared cluster of this process (one per pytest-xdist worker), while it is up.
_shared: list[contextlib.ExitStack] = []


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A 3-node `corral up` cluster shared by the tests that use it, torn down after the
    last of them (the root conftest.py runs them one after another on one worker), so
    its daemons do not idle beside the rest of the suite."""
    stack = contextlib.ExitStack()
    _shared.append(stack)
    try:
        yield stack.enter_context(local_cluster(NODES))
    finally:
        stack.close()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _shared and "cluster" in getattr(item, "fixturenames", ()):
        if nextitem is not None and "cluster" in getattr(nextitem, "fixturenames", ()):
            return
        _shared.pop().close()  # `corral down` now; the fixture's own teardown is a no-op
