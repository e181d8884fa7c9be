"""Where a node's cgroups live: the cgroup2 subtree the node owns (never the root's).

The pod runtime makes its pods' cgroups below it, and the eBPF proxy attaches its
socket programs to it, so both read the path from here.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def unified_root(root: str = CGROUP_ROOT) -> str:
    """The cgroup2 mount: `<root>/unified` on a hybrid hierarchy, else `root` itself."""
    u = os.path.join(root, "unified")
    return u if os.path.isfile(os.path.join(u, "cgroup.controllers")) else root


def node_unified_dir(node: str, root: str = CGROUP_ROOT) -> str:
    """The node's own cgroup2 directory, `<cgroup2>/corral/<node>`."""
    return os.path.join(unified_root(root), "corral", node)
