"""Whole-cluster fixtures: the session's shared `corral up` cluster (see clusters.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clusters import NODES, LocalCluster, local_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A 3-node `corral up` cluster for the whole session, torn down at the end."""
    with local_cluster(NODES) as c:
        yield c
