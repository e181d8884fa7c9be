"""The C calls corral's BPF code makes: libbpf 1.x, libc's statfs/mount, libbcc's table info.

Every ctypes prototype lives here and nowhere else. libbpf (libbcc's own
dependency) does what BCC 0.26's Python side lacks: query and attach with
flags, programs and maps by id or pin, map calls and batch calls on any fd.
Its functions return -errno; `check` turns that into OSError.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

_u32p = ctypes.POINTER(ctypes.c_uint32)
_vp = ctypes.c_void_p
_int, _u32, _u64, _str = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_char_p


class AttachOpts(ctypes.Structure):
    # libbpf 1.1's struct bpf_prog_attach_opts; `sz` keeps newer libbpf compatible
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("replace_fd", ctypes.c_int)]


class MapCreateOpts(ctypes.Structure):
    """libbpf 1.1's struct bpf_map_create_opts (only `map_flags` is set by corral)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (the kernel fills what fits)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


_LIBBPF: dict[str, tuple[Any, list[Any]]] = {
    # name: (restype, argtypes)
    "bpf_prog_query": (_int, [_int, _int, _u32, _u32p, _u32p, _u32p]),
    "bpf_prog_get_fd_by_id": (_int, [_u32]),
    "bpf_obj_get_info_by_fd": (_int, [_int, _vp, _u32p]),
    "bpf_prog_attach_opts": (_int, [_int, _int, _int, ctypes.POINTER(AttachOpts)]),
    "bpf_prog_detach2": (_int, [_int, _int, _int]),
    "bpf_obj_get": (_int, [_str]),
    "bpf_obj_pin": (_int, [_int, _str]),
    "bpf_map_create": (_int, [_int, _str, _u32, _u32, _u32, ctypes.POINTER(MapCreateOpts)]),
    "bpf_map_lookup_elem": (_int, [_int, _vp, _vp]),
    "bpf_map_update_elem": (_int, [_int, _vp, _vp, _u64]),
    "bpf_map_delete_elem": (_int, [_int, _vp]),
    "bpf_map_get_next_key": (_int, [_int, _vp, _vp]),
    # the batch calls; NULL opts: no flags
    "bpf_map_update_batch": (_int, [_int, _vp, _vp, _u32p, _vp]),
    "bpf_map_delete_batch": (_int, [_int, _vp, _u32p, _vp]),
    "bpf_map_lookup_batch": (_int, [_int, _vp, _vp, _vp, _vp, _u32p, _vp]),
    "libbpf_num_possible_cpus": (_int, []),
}

_LIBBCC: dict[str, tuple[Any, list[Any]]] = {
    # the tables a BCC module declares, by name: fd and layout
    "bpf_table_fd": (_int, [_vp, _str]),
    "bpf_table_type": (_int, [_vp, _str]),
    "bpf_table_key_size": (ctypes.c_size_t, [_vp, _str]),
    "bpf_table_leaf_size": (ctypes.c_size_t, [_vp, _str]),
    "bpf_table_max_entries": (ctypes.c_size_t, [_vp, _str]),
}


def _declared(soname: str, protos: dict[str, tuple[Any, list[Any]]]) -> Any:
    lib = ctypes.CDLL(soname, use_errno=True)
    for name, (res, args) in protos.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


@functools.cache
def bpf() -> Any:
    """libbpf 1.x with corral's prototypes."""
    return _declared("libbpf.so.1", _LIBBPF)


@functools.cache
def bcc_tables() -> Any:
    """libbcc's table descriptions (BCC's Python declares few of them)."""
    return _declared("libbcc.so.0", _LIBBCC)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [_str, _vp]
_libc.mount.argtypes = [_str, _str, _str, ctypes.c_ulong, _vp]


def check(rc: int, what: str) -> int:
    """`rc` when it is not a libbpf error (-errno), else OSError naming `what`."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def obj_info(fd: int, info: ctypes.Structure) -> Any:
    """Fill `info` (MapInfo, ProgInfo) from the kernel's view of the object at `fd`."""
    n = ctypes.c_uint32(ctypes.sizeof(info))
    check(bpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "bpf_obj_get_info")
    return info


def statfs_type(path: str) -> int:
    """The filesystem magic of `path` (f_type of statfs(2))."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.statfs(path.encode(), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"statfs {path}: {os.strerror(e)}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def mount(source: str, target: str, fstype: str, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {source} {target}: {os.strerror(e)}")
