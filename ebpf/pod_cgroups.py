"""The `pod_cgroups` map: a pod's cgroup2 id -> its IP, for the eBPF proxy's ClientIP affinity.

ebpf/proxy_sock.c keys affinity by the client pod's IP, but connect() runs
before the socket has a source address. Every process of a pod lives in the
pod's own cgroup2 directory (runtime/cgroups.py), whose id (the directory's
inode number, what bpf_get_current_cgroup_id() returns) the node runtime maps
to the pod's IP once CNI ADD gave it one, and forgets when the pod's cgroup
goes. The map is pinned at /sys/fs/bpf/corral/<node>/pod_cgroups; whichever
of the runtime and the proxy comes first creates it (no BCC), the other
opens the pin (the proxy's BCC load reuses it as CORRAL_PINNED).
Key u64 cgroup id, value u32 IPv4 in network order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from corral.ebpf import loader, pinned_map
from corral.ebpf.pinned_map import HASH, BpfMap, MapSpec, ip_key, ip_of

MAP = "pod_cgroups"
SPEC = MapSpec(MAP, HASH, ctypes.c_uint64, ctypes.c_uint32, 16384)  # 16384 pods per node


def pin_path(node: str) -> str:
    return os.path.join(loader.pin_dir(node), MAP)


def open_map(node: str, create: bool = True) -> BpfMap | None:
    """The pinned map (created and pinned when missing and `create`); None: none.

    Not recreated when laid out otherwise: its entries name running pods.
    """
    path = pin_path(node)
    if not create:
        return BpfMap.open(path, SPEC)
    loader.ensure_bpffs()
    return BpfMap.pinned(path, SPEC)


def cgroup_id(directory: str) -> int:
    """A cgroup2 directory's id, as bpf_get_current_cgroup_id() sees it (its inode)."""
    return os.stat(directory).st_ino


def set_ip(node: str, cgroup_dir: str, ip: str) -> int:
    """Map the cgroup at `cgroup_dir` to pod IP `ip`; its cgroup id."""
    cid = cgroup_id(cgroup_dir)
    m = open_map(node)
    assert m is not None
    with m:
        m.put(cid, ip_key(ip))
    return cid


def forget(node: str, cgroup_dir: str) -> bool:
    """Drop the entry of the cgroup at `cgroup_dir` (before it is removed); False: none."""
    try:
        cid = cgroup_id(cgroup_dir)
    except FileNotFoundError:
        return False
    m = open_map(node, create=False)
    if m is None:
        return False
    with m:
        return m.delete(cid)


def lookup(node: str, cgroup_dir: str) -> str | None:
    """The IP mapped to a cgroup (for tests and `corral net`), None when none."""
    m = open_map(node, create=False)
    if m is None:
        return None
    with m:
        v = m.get(cgroup_id(cgroup_dir))
    return None if v is None else ip_of(v)


def unpin(node: str) -> bool:
    """Remove the pin (the node's pods are gone); the node's pin folder too when empty."""
    path = pin_path(node)
    if not pinned_map.unpin(path):
        return False
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
    return True
