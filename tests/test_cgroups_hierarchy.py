"""Pod cgroups on each hierarchy. This machine is hybrid (v1 controllers, cgroup2 at
/sys/fs/cgroup/unified), and v1 limits are enforced for real in tests/test_runtime.py
(a memory hog OOMKilled, the CFS quota written). The unified (cgroup2-only, stock
Debian 12) and legacy (v1-only) layouts are exercised here on a fake cgroupfs in a
temp dir laid out as the kernel lays it out: a child's cgroup.controllers is what its
parent's cgroup.subtree_control enables, and the limits are the files the kernel
reads (memory.max, cpu.max, cpu.weight, pids.max; memory.events for OOM kills)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from corral.api.objects import Container
from corral.node import cgroups as nodecg
from corral.runtime.cgroups import Limits, PodCgroups

ROOT_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _read(path: Path) -> str:
    return path.read_text().strip()


@pytest.fixture
def unified(tmp_path: Path) -> Path:
    """/sys/fs/cgroup of a unified machine: cgroup2 at the root, systemd having
    delegated cpu, memory and pids to the root's children."""
    _write(tmp_path / "cgroup.controllers", ROOT_CONTROLLERS)
    _write(tmp_path / "cgroup.subtree_control", "cpu memory pids\n")
    _write(tmp_path / "cgroup.procs", "1\n")
    _write(tmp_path / "system.slice" / "cgroup.procs", "")
    return tmp_path


@pytest.fixture
def hybrid(tmp_path: Path) -> Path:
    for c in ("memory", "cpu", "pids"):
        (tmp_path / c).mkdir()
    _write(tmp_path / "unified" / "cgroup.controllers", "hugetlb\n")
    _write(tmp_path / "unified" / "cgroup.subtree_control", "")
    return tmp_path


@pytest.fixture
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("legacy")
    for c in ("memory", "cpu", "pids"):
        (d / c).mkdir()
    return d


def _container(name: str, limits: dict | None = None, requests: dict | None = None) -> Container:
    return Container.model_validate(
        {
            "name": name,
            "command": ["true"],
            "resources": {"limits": limits or {}, "requests": requests or {}},
        }
    )


def test_the_three_layouts_are_told_apart(
    unified: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert nodecg.hierarchy(str(unified)) == "unified"
    assert nodecg.cgroup2_root(str(unified)) == str(unified)
    h = tmp_path_factory.mktemp("hybrid")
    for c in ("memory", "cpu"):
        (h / c).mkdir()
    _write(h / "unified" / "cgroup.controllers", "hugetlb\n")
    assert nodecg.hierarchy(str(h)) == "hybrid"
    assert nodecg.node_unified_dir("n1", str(h)) == str(h / "unified" / "corral" / "n1")
    legacy = tmp_path_factory.mktemp("legacy")
    (legacy / "memory").mkdir()
    assert nodecg.hierarchy(str(legacy)) == "legacy" and nodecg.cgroup2_root(str(legacy)) is None
    # this machine, read from /proc/self/mountinfo
    assert nodecg.hierarchy() == "hybrid"
    assert nodecg.cgroup2_mount() == "/sys/fs/cgroup/unified"


# ruff: noqa: E501  (mountinfo lines as the kernel writes them)
MOUNTINFO_UNIFIED = """\
24 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
MOUNTINFO_HYBRID = """\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 30 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
"""
MOUNTINFO_ELSEWHERE = """\
40 1 0:33 / /run/my\\040cgroup2 rw,relatime - cgroup2 none rw
"""


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (MOUNTINFO_UNIFIED, "/sys/fs/cgroup"),
        (MOUNTINFO_HYBRID, "/sys/fs/cgroup/unified"),
        (MOUNTINFO_ELSEWHERE, "/run/my cgroup2"),
        ("33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", None),
    ],
)
def test_the_cgroup2_mount_comes_from_mountinfo(
    tmp_path: Path, text: str, want: str | None
) -> None:
    (tmp_path / "mountinfo").write_text(text)
    assert nodecg.cgroup2_mount(str(tmp_path / "mountinfo")) == want


def test_nothing_hard_codes_the_hybrid_cgroup2_path() -> None:
    """The cgroup2 mount is found, not assumed: no production module names
    /sys/fs/cgroup/unified (docs and comments may)."""
    here = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(
        ["git", "-C", str(here), "ls-files", "*.py"], capture_output=True, text=True, check=True
    ).stdout.split()
    found = [
        f
        for f in tracked
        if not f.startswith(("tests/", "bench/", "integration/"))
        and '"/sys/fs/cgroup/unified"' in (here / f).read_text()
    ]
    assert found == []


def test_unified_limits_go_to_cgroup2_files(unified: Path) -> None:
    app = {
        "web": Limits.of(_container("web", {"memory": "256Mi", "cpu": "500m"}, {"cpu": "250m"})),
        "side": Limits.of(_container("side", {"memory": "64Mi", "cpu": "100m"})),
    }
    init = {"setup": Limits.of(_container("setup", {"memory": "512Mi"}))}
    cg = PodCgroups("n1", "uid-1", root=str(unified), pids_limit=1024)
    cg.create(app, init)
    pod = unified / "corral" / "n1" / "pods" / "uid-1"
    assert cg.v2_dir == str(pod)
    # each level of corral's subtree hands memory, cpu and pids to its children
    for d in (unified / "corral", unified / "corral" / "n1", pod.parent, pod):
        assert set(_read(d / "cgroup.subtree_control").replace("+", "").split()) == {
            "cpu",
            "memory",
            "pids",
        }
    # the pod: the larger of the app containers' sum and the largest init container
    assert _read(pod / "memory.max") == str(512 << 20)
    assert _read(pod / "cpu.max") == "60000 100000"
    web = pod / "web"
    assert _read(web / "memory.max") == str(256 << 20)
    assert _read(web / "memory.swap.max") == "0"
    assert _read(web / "cpu.max") == "50000 100000"
    # requests.cpu 250m = 256 shares = weight 10 (the kubelet's conversion)
    assert _read(web / "cpu.weight") == str(1 + ((256 - 2) * 9999) // 262142) == "10"
    assert _read(web / "pids.max") == "1024"
    assert _read(pod / "side" / "cpu.max") == "10000 100000"
    assert _read(pod / "setup" / "memory.max") == str(512 << 20)
    # processes join their container's leaf only (no internal processes on cgroup2)
    assert cg.procs_files("web") == [str(web / "cgroup.procs")]
    # no v1 directory anywhere
    assert not any((unified / c).exists() for c in ("memory", "cpu", "pids"))
    # OOM kills from the leaf's memory.events
    assert cg.oom_kills("web") == 0
    _write(web / "memory.events", "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert cg.oom_kills("web") == 2


def test_unified_without_limits_writes_max(unified: Path) -> None:
    cg = PodCgroups("n1", "uid-2", root=str(unified))
    cg.create({"c": Limits.of(_container("c"))})
    leaf = unified / "corral" / "n1" / "pods" / "uid-2" / "c"
    assert _read(leaf / "memory.max") == "max"
    assert _read(leaf / "cpu.max") == "max 100000"
    assert _read(leaf / "cpu.weight") == "1"  # 2 shares: the least, as the kubelet's
    assert _read(leaf / "pids.max") == "max"
    assert _read(leaf.parent / "memory.max") == "max"


def test_unified_refuses_when_the_host_does_not_delegate(unified: Path) -> None:
    (unified / "cgroup.subtree_control").write_text("cpu\n")
    cg = PodCgroups("n1", "uid-3", root=str(unified))
    with pytest.raises(OSError, match="does not delegate memory, pids"):
        cg.create({"c": Limits.of(_container("c", {"memory": "1Mi"}))})


def test_hybrid_and_legacy_write_v1(hybrid: Path, legacy: Path) -> None:
    lim = {"c": Limits.of(_container("c", {"memory": "128Mi", "cpu": "200m"}))}
    h = PodCgroups("n1", "u", root=str(hybrid))
    h.create(lim)
    assert _read(hybrid / "memory" / "corral" / "n1" / "u" / "c" / "memory.limit_in_bytes") == str(
        128 << 20
    )
    assert _read(hybrid / "cpu" / "corral" / "n1" / "u" / "c" / "cpu.cfs_quota_us") == "20000"
    # the pod's cgroup2 directory exists (the eBPF proxy's), with no controller file
    v2 = hybrid / "unified" / "corral" / "n1" / "pods" / "u"
    assert v2.is_dir() and not (v2 / "memory.max").exists()
    assert h.procs_files("c")[-1] == str(v2 / "cgroup.procs")
    old = PodCgroups("n1", "u", root=str(legacy))
    old.create(lim)
    assert _read(legacy / "memory" / "corral" / "n1" / "u" / "c" / "memory.limit_in_bytes") == str(
        128 << 20
    )
    assert all("unified" not in f for f in old.procs_files("c"))
    assert not os.path.exists(legacy / "unified")
