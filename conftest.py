"""Suite-wide pytest hooks: how `pytest -n N` (pytest-xdist, `--dist loadgroup`) spreads
the tests over workers.

Each worker is its own process with its own session fixtures, so a test that shares an
expensive fixture must run on the worker that already has it. Every test gets an
`xdist_group` here, so no test file has to carry markers:

- tests that use the session's shared `corral up` cluster (`cluster`) form one group,
  so one worker starts one cluster for all of them;
- tests that use a module- or class-scoped fixture (a module's own cluster, a compiled
  BPF object, a testbed) are grouped by module, and by the fixture's parameter where
  the module fixture is parametrized (each proxy mode's cluster can start on its own
  worker);
- everything else is a group of one, sent to whichever worker is free.

The items are also sorted so the long groups (whole clusters) are handed out first
and the short tests fill in around them.

Without `-n` (or with `-n 0`) the markers are inert and the suite runs serially.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

# Session fixtures too costly to build once per worker: their users share one worker.
SHARED_SESSION = ("cluster",)


def _group(item: pytest.Item) -> str | None:
    names = getattr(item, "fixturenames", ())
    for name in SHARED_SESSION:
        if name in names:
            return f"session-{name}"
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    scoped = sorted(
        name
        for name, defs in info.name2fixturedefs.items()
        if defs and defs[-1].scope in ("module", "class", "package")
    )
    if not scoped:
        return None
    module = item.nodeid.split("::", 1)[0]
    callspec: Any = getattr(item, "callspec", None)
    params = [f"{n}={callspec.params[n]}" for n in scoped if callspec and n in callspec.params]
    # No "]" in a group name: xdist reads the group after the last "@" only when that
    # "@" comes after the node id's last "]" (else it falls back to module scopes).
    return module + ("|" + ",".join(params) if params else "")


def _rank(item: pytest.Item, group: str | None) -> int:
    """Longest work first: the groups that start clusters, then other groups, then the
    single tests that fill the gaps (run-tests.sh keeps this order: --no-loadscope-reorder,
    else xdist would hand out the groups with the most tests first)."""
    if group is None:
        return 2
    return 0 if item.nodeid.startswith("integration/") else 1


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Iterator[None]:
    # Before every other implementation: xdist's own (in each worker) turns the markers
    # into the "@group" suffix of the node id that its scheduler reads.
    rank: dict[int, tuple[int, int]] = {}
    first: dict[str, int] = {}  # a group's place: where its first test is
    for i, item in enumerate(items):
        group = _group(item)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
        place = first.setdefault(group, i) if group is not None else i
        rank[id(item)] = (_rank(item, group), place)
    yield
    if getattr(config.option, "loadgroup", False):  # set in pytest-xdist workers
        grouped = [i.nodeid for i in items if i.get_closest_marker("xdist_group")]
        if any(n.rfind("@") < n.rfind("]") for n in grouped):
            raise pytest.UsageError("a test group's name has a ']': xdist would not group it")
        if grouped and not all("@" in n for n in grouped):
            raise pytest.UsageError(
                "pytest-xdist did not group the tests (pytest 9.2 with xdist 3.8, xdist "
                "issue #1386): install the pytest that pyproject.toml pins"
            )
    # After every other (pytest's reordering by fixture scope among them). Stable: a
    # group's tests stay in their order, and together (also when run serially, so a
    # module's or the shared cluster's tests do not interleave).
    items.sort(key=lambda item: rank.get(id(item), (2, len(items))))


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
