"""The `pod_cgroups` map: a pod's cgroup2 id -> its IP, for the eBPF proxy's ClientIP affinity.

ebpf/proxy_sock.c keys affinity by the client pod's IP, but connect() runs
before the socket has a source address. Every process of a pod lives in the
pod's own cgroup2 directory (runtime/cgroups.py), whose id (the directory's
inode number, what bpf_get_current_cgroup_id() returns) the node runtime maps
to the pod's IP once CNI ADD gave it one, and forgets when the pod's cgroup
goes. The map is pinned at /sys/fs/bpf/corral/<node>/pod_cgroups; whichever
of the runtime and the proxy comes first creates it (libbpf, no BCC), the
other opens the pin (the proxy's BCC load reuses it as CORRAL_PINNED).
Key u64 cgroup id, value u32 IPv4 in network order.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os

from corral.ebpf import loader

MAP = "pod_cgroups"
MAX_ENTRIES = 16384  # pods per node
BPF_MAP_TYPE_HASH = 1


def pin_path(node: str) -> str:
    return os.path.join(loader.pin_dir(node), MAP)


def _lib() -> ctypes.CDLL:
    lib = loader._bpf()
    if not getattr(lib, "_corral_pod_cgroups", False):
        vp = ctypes.c_void_p
        lib.bpf_map_create.argtypes = [
            ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, vp,
        ]  # fmt: skip
        lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        lib.bpf_map_update_elem.argtypes = [ctypes.c_int, vp, vp, ctypes.c_uint64]
        lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, vp]
        lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, vp, vp]
        lib._corral_pod_cgroups = True
    return lib


def open_map(node: str, create: bool = True) -> int | None:
    """An fd on the pinned map (created and pinned when missing and `create`); None: none."""
    lib, path = _lib(), pin_path(node)
    for _ in range(3):
        if os.path.exists(path):
            fd = lib.bpf_obj_get(path.encode())
            if fd >= 0:
                return fd
            if -fd != errno.ENOENT:
                raise OSError(-fd, f"bpf_obj_get {path}: {os.strerror(-fd)}")
        if not create:
            return None
        loader.ensure_bpffs()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = lib.bpf_map_create(BPF_MAP_TYPE_HASH, MAP.encode(), 8, 4, MAX_ENTRIES, None)
        if fd < 0:
            raise OSError(-fd, f"create map {MAP}: {os.strerror(-fd)}")
        rc = lib.bpf_obj_pin(fd, path.encode())
        if rc == 0:
            return fd
        os.close(fd)
        if -rc != errno.EEXIST:  # EEXIST: the other side pinned it first; open theirs
            raise OSError(-rc, f"pin {path}: {os.strerror(-rc)}")
    raise OSError(errno.EAGAIN, f"{path}: pinned and unpinned under us")


def cgroup_id(directory: str) -> int:
    """A cgroup2 directory's id, as bpf_get_current_cgroup_id() sees it (its inode)."""
    return os.stat(directory).st_ino


def set_ip(node: str, cgroup_dir: str, ip: str) -> int:
    """Map the cgroup at `cgroup_dir` to pod IP `ip`; its cgroup id."""
    cid = cgroup_id(cgroup_dir)
    fd = open_map(node)
    assert fd is not None
    try:
        k, v = ctypes.c_uint64(cid), ctypes.c_uint32(loader.ip_key(ip))
        rc = _lib().bpf_map_update_elem(fd, ctypes.byref(k), ctypes.byref(v), 0)
        if rc < 0:
            raise OSError(-rc, f"{pin_path(node)}: update: {os.strerror(-rc)}")
    finally:
        os.close(fd)
    return cid


def forget(node: str, cgroup_dir: str) -> bool:
    """Drop the entry of the cgroup at `cgroup_dir` (before it is removed); False: none."""
    try:
        cid = cgroup_id(cgroup_dir)
    except FileNotFoundError:
        return False
    fd = open_map(node, create=False)
    if fd is None:
        return False
    try:
        k = ctypes.c_uint64(cid)
        return _lib().bpf_map_delete_elem(fd, ctypes.byref(k)) == 0
    finally:
        os.close(fd)


def lookup(node: str, cgroup_dir: str) -> str | None:
    """The IP mapped to a cgroup (for tests and `corral net`), None when none."""
    import socket

    fd = open_map(node, create=False)
    if fd is None:
        return None
    try:
        k, v = ctypes.c_uint64(cgroup_id(cgroup_dir)), ctypes.c_uint32()
        if _lib().bpf_map_lookup_elem(fd, ctypes.byref(k), ctypes.byref(v)) != 0:
            return None
        return socket.inet_ntoa(v.value.to_bytes(4, "little"))
    finally:
        os.close(fd)


def unpin(node: str) -> bool:
    """Remove the pin (the node's pods are gone); the node's pin folder too when empty."""
    path = pin_path(node)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
    return True
