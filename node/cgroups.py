"""Where a node's cgroups live: the cgroup2 subtree the node owns (never the root's),
and which hierarchy the machine has.

The three layouts a Linux machine can have (the kubelet's `cm` tells them apart the
same way):
- unified: only cgroup2, mounted at /sys/fs/cgroup with the cpu, memory and pids
  controllers (Debian 12, any systemd machine since ~2021);
- hybrid: the v1 controllers under /sys/fs/cgroup/<controller>, and a cgroup2
  mount (usually /sys/fs/cgroup/unified) holding no resource controllers;
- legacy: v1 only, no cgroup2.
The cgroup2 mount is found in /proc/self/mountinfo, not assumed. The pod runtime
makes its pods' cgroups below the node's directory and the eBPF proxy attaches its
socket programs to it, so both read the path from here. `root` other than
/sys/fs/cgroup is a test's fake cgroupfs, recognised by its files as the kernel
lays them out.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

from corral.node.mounts import mountinfo

CGROUP_ROOT = "/sys/fs/cgroup"
RESOURCE_CONTROLLERS = ("memory", "cpu", "pids")

Hierarchy = Literal["unified", "hybrid", "legacy"]


@functools.lru_cache(maxsize=8)
def cgroup2_mount(mountinfo_path: str = "/proc/self/mountinfo") -> str | None:
    """The cgroup2 mount point of this mount namespace (the one under /sys/fs/cgroup
    when there are several), or None on a v1-only machine."""
    try:
        points = [m.mount_point for m in mountinfo(mountinfo_path) if m.fstype == "cgroup2"]
    except OSError:
        return None
    for p in points:
        if p == CGROUP_ROOT or p.startswith(CGROUP_ROOT + "/"):
            return p
    return points[0] if points else None


def _v1_mounted(mountinfo_path: str = "/proc/self/mountinfo") -> set[str]:
    """The v1 resource controllers mounted (from the mounts' super options)."""
    out: set[str] = set()
    try:
        for m in mountinfo(mountinfo_path):
            if m.fstype == "cgroup":
                out.update(set(m.super_options.split(",")) & set(RESOURCE_CONTROLLERS))
    except OSError:
        pass
    return out


def cgroup2_root(root: str = CGROUP_ROOT) -> str | None:
    """The cgroup2 hierarchy's root directory, or None when there is none."""
    if root == CGROUP_ROOT:
        return cgroup2_mount()
    for d in (root, os.path.join(root, "unified")):
        if os.path.isfile(os.path.join(d, "cgroup.controllers")):
            return d
    return None


def hierarchy(root: str = CGROUP_ROOT) -> Hierarchy:
    cg2 = cgroup2_root(root)
    if root == CGROUP_ROOT:
        v1 = bool(_v1_mounted())
    else:
        v1 = cg2 != root and any(os.path.isdir(os.path.join(root, c)) for c in RESOURCE_CONTROLLERS)
    if cg2 is None:
        return "legacy"
    return "hybrid" if v1 else "unified"


def unified_root(root: str = CGROUP_ROOT) -> str:
    """The cgroup2 mount (`<root>/unified` on this machine's hybrid hierarchy, `root` on
    a unified one); `<root>/unified` on a v1-only machine, where nothing exists."""
    return cgroup2_root(root) or os.path.join(root, "unified")


def node_unified_dir(node: str, root: str = CGROUP_ROOT) -> str:
    """The node's own cgroup2 directory, `<cgroup2>/corral/<node>`."""
    return os.path.join(unified_root(root), "corral", node)


def read_controllers(path: str) -> set[str]:
    """A cgroup.controllers or cgroup.subtree_control file's names (`+x` as written to
    a fake one counts as `x`); empty when it is missing."""
    try:
        with open(path) as f:
            return {w.lstrip("+") for w in f.read().split() if not w.startswith("-")}
    except OSError:
        return set()
