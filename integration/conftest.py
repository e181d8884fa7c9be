"""Whole-cluster fixtures: the session's shared `corral up` cluster (see clusters.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from clusters import NODES, LocalCluster, local_cluster


@pytest.fixture(scope="session", autouse=True)
def private_kubeconfig() -> Iterator[str]:
    """`corral up` merges a context into $KUBECONFIG (else ~/.kube/config): point it at
    a file of this session's, in os.environ so every `corral` subprocess inherits it."""
    d = tempfile.mkdtemp(prefix="corral-test-kubeconfig-")
    path = os.path.join(d, "config")
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """A 3-node `corral up` cluster for the whole session, torn down at the end."""
    with local_cluster(NODES) as c:
        yield c
