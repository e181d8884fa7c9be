"""Loading corral's BPF programs with BCC; hanging them on tc hooks and cgroups.

BCC compiles the C sources in this folder when a daemon starts (about half a
second of CPU each). It needs Debian's python3-bpfcc (exposed to the venv by
scripts/bootstrap.sh) and kernel headers at /lib/modules/$(uname -r)/build.
`unavailable()` says which is missing, so callers can fall back to a kernel
path and say why.

corral's tc programs sit on clsact ingress at one priority (`PRIO`) and
handle, so replacing one (a restarted daemon's fresh load) is atomic and
listing or removing them never touches anyone else's filters.

corral's cgroup programs (`CgroupPrograms`) are named `corral_*` and attached
with BPF_F_ALLOW_MULTI, next to anybody else's; a fresh load replaces corral's
program of the same name on the same hook in one BPF_F_REPLACE attach (no
moment without it), and listing or detaching looks only at `corral_*` names.
They stay attached when the daemon exits (plain prog_attach, no bpf_link).

Maps a source declares with `CORRAL_PINNED(type, key, leaf, name, max)` are
pinned at /sys/fs/bpf/corral/<node>/<name> when the load names a node: the
next load of any source naming that map reuses the pinned one (same map id,
entries kept), which is BCC's BPF_TABLE_PINNED. Without a node they are plain
maps. `remove_pins(node)` removes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

HERE = os.path.dirname(os.path.abspath(__file__))
PRIO = 0xC0DE
HANDLE = 1
INGRESS = 0xFFFFFFF2  # clsact's ingress hook

BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "corral")
CGROUP2_ROOT = "/sys/fs/cgroup/unified"  # this machine's cgroup2 mount (hybrid hierarchy)
CGROUP_PREFIX = "corral_"  # every corral cgroup program's name starts with it
NAME_MAX = 15  # BPF_OBJ_NAME_LEN - 1: the kernel keeps this much of a program's name

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2
ENOTSUPP = 524  # the kernel's own "not supported" (no batch ops for this map type)

# prog types and attach types from uapi/linux/bpf.h
SCHED_CLS, CGROUP_SKB, CGROUP_SOCK, CGROUP_SOCK_ADDR = 3, 8, 9, 18
HOOKS: dict[str, tuple[int, int]] = {
    # name: (program type, attach type)
    "ingress": (CGROUP_SKB, 0),
    "egress": (CGROUP_SKB, 1),
    "sock_create": (CGROUP_SOCK, 2),
    "bind4": (CGROUP_SOCK_ADDR, 8),
    "bind6": (CGROUP_SOCK_ADDR, 9),
    "connect4": (CGROUP_SOCK_ADDR, 10),
    "connect6": (CGROUP_SOCK_ADDR, 11),
    "post_bind4": (CGROUP_SOCK, 12),
    "post_bind6": (CGROUP_SOCK, 13),
    "sendmsg4": (CGROUP_SOCK_ADDR, 14),
    "sendmsg6": (CGROUP_SOCK_ADDR, 15),
    "recvmsg4": (CGROUP_SOCK_ADDR, 19),
    "recvmsg6": (CGROUP_SOCK_ADDR, 20),
    "getpeername4": (CGROUP_SOCK_ADDR, 29),
    "getpeername6": (CGROUP_SOCK_ADDR, 30),
    "getsockname4": (CGROUP_SOCK_ADDR, 31),
    "getsockname6": (CGROUP_SOCK_ADDR, 32),
    "sock_release": (CGROUP_SOCK, 34),
}
_HOOK_OF_ATTACH = {attach: hook for hook, (_, attach) in HOOKS.items()}
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

# The pinning macro every source may use; with no node it is a plain table.
_PINNED_MACRO = "CORRAL_PINNED(t,k,v,n,m)="
_PINNED = _PINNED_MACRO + 'BPF_TABLE_PINNED(t,k,v,n,m,CORRAL_PIN_DIR "/" #n)'
_UNPINNED = _PINNED_MACRO + "BPF_TABLE(t,k,v,n,m)"


class BPFUnavailable(RuntimeError):
    """BCC or the kernel headers are missing, or a program did not compile or load."""


class CgroupError(RuntimeError):
    """A cgroup attach or detach was refused (by corral's rules or by the kernel)."""


def unavailable() -> str | None:
    """Why BCC cannot compile here, or None when it should."""
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"BCC's Python bindings are not importable ({e}); run scripts/bootstrap.sh"
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.isdir(os.path.join(build, "include")):
        return f"no kernel headers at {build}; run scripts/bootstrap.sh"
    return None


# ------------------------------------------------------------------ syscalls

_libc = ctypes.CDLL(None, use_errno=True)
_libbpf: Any = None


def _bpf() -> Any:
    """libbpf 1.x (libbcc's own dependency): attach with flags, query, info by fd.

    Its functions return -errno. BCC 0.26's Python side has no query, no
    BPF_F_REPLACE and no program-by-id, so those come from here.
    """
    global _libbpf
    if _libbpf is None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        u32p = ctypes.POINTER(ctypes.c_uint32)
        lib.bpf_prog_query.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_uint32, u32p, u32p, u32p,
        ]  # fmt: skip
        lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
        lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, u32p]
        lib.bpf_prog_attach_opts.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_AttachOpts),
        ]  # fmt: skip
        lib.bpf_prog_detach2.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        _libbpf = lib
    return _libbpf


_bcc_lib: Any = None


def _bcc_tables() -> Any:
    """libbcc's table descriptions, with prototypes (BCC's Python declares few of them)."""
    global _bcc_lib
    if _bcc_lib is None:
        lib = ctypes.CDLL("libbcc.so.0")
        for fn, res in (
            ("bpf_table_fd", ctypes.c_int),
            ("bpf_table_type", ctypes.c_int),
            ("bpf_table_key_size", ctypes.c_size_t),
            ("bpf_table_leaf_size", ctypes.c_size_t),
            ("bpf_table_max_entries", ctypes.c_size_t),
        ):
            getattr(lib, fn).restype = res
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _bcc_lib = lib
    return _bcc_lib


class _AttachOpts(ctypes.Structure):
    # libbpf 1.1's struct bpf_prog_attach_opts; `sz` keeps newer libbpf compatible
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("replace_fd", ctypes.c_int)]


class _ProgInfo(ctypes.Structure):
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


class _MapInfo(ctypes.Structure):
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


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _info(fd: int, info: ctypes.Structure) -> Any:
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check(
        _bpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "bpf_obj_get_info"
    )
    return info


def map_info(fd: int) -> _MapInfo:
    """The kernel's view of a map: `.id`, `.type`, `.key_size`, `.value_size`, `.max_entries`."""
    return _info(fd, _MapInfo())


def prog_info(fd: int) -> _ProgInfo:
    return _info(fd, _ProgInfo())


def _statfs_type(path: str) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.statfs(path.encode(), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"statfs {path}: {os.strerror(e)}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


# ------------------------------------------------------------------ bpffs and pins


def ensure_bpffs(path: str = BPFFS) -> bool:
    """Mount the BPF filesystem at `path` unless it is there; True if this call mounted it.

    Mounts land in the caller's mount namespace and each mount is a new, empty
    bpffs: do this on the host before node mount namespaces are made (they
    copy the host's mounts), or pins made inside one die with it.
    """
    if _statfs_type(path) == BPF_FS_MAGIC:
        return False
    if _libc.mount(b"bpf", path.encode(), b"bpf", 0, b"mode=0700") != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t bpf bpf {path}: {os.strerror(e)}")
    return True


def pin_dir(node: str) -> str:
    """/sys/fs/bpf/corral/<node>: where a node's pinned maps live."""
    if not _NODE_NAME.fullmatch(node):
        raise ValueError(f"node name {node!r} cannot name a pin directory (letters, digits, ._-)")
    return os.path.join(PIN_ROOT, node)


def pinned(node: str) -> list[str]:
    """Names pinned for `node`, sorted ([] when none)."""
    try:
        return sorted(os.listdir(pin_dir(node)))
    except FileNotFoundError:
        return []


def remove_pins(node: str) -> list[str]:
    """Unpin everything of `node` and remove its directory; the names removed.

    A map dies when its last user goes: programs still attached keep theirs.
    """
    d = pin_dir(node)
    gone = pinned(node)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(d)  # bpffs: unlink drops the pin, rmdir the empty folder
    with contextlib.suppress(OSError):
        os.rmdir(PIN_ROOT)  # only when no node has pins left
    return gone


# ------------------------------------------------------------------ loading


class _Loaded:
    """One C source compiled by BCC; its programs loaded with their types.

    `bpf` is the BCC object, for what the loader does not wrap.
    """

    def __init__(
        self,
        source: str,
        programs: Mapping[str, tuple[int, int]],
        node: str | None = None,
        cflags: Iterable[str] = (),
    ) -> None:
        why = unavailable()
        if why:
            raise BPFUnavailable(why)
        from bcc import BPF

        path = source if os.path.isabs(source) else os.path.join(HERE, source)
        flags = list(cflags)
        self.node = node
        self._closed = False
        if node is not None:
            d = pin_dir(node)
            try:
                ensure_bpffs()
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise BPFUnavailable(f"cannot pin maps under {d}: {e}") from e
            flags += [f'-DCORRAL_PIN_DIR="{d}"', "-D" + _PINNED]
        else:
            flags += ["-D" + _UNPINNED]
        try:
            self.bpf = BPF(src_file=path.encode(), cflags=flags)
        except Exception as e:
            raise BPFUnavailable(f"cannot compile {path}: {e}") from e
        try:
            self._check_pins()
            self.fns = {
                name: self.bpf.load_func(name.encode(), ptype, attach_type=attach)
                for name, (ptype, attach) in programs.items()
            }
        except BPFUnavailable:
            self.bpf.cleanup()
            raise
        except Exception as e:
            self.bpf.cleanup()
            raise BPFUnavailable(f"cannot load {path}: {e}") from e

    def _check_pins(self) -> None:
        """Refuse a pinned map whose kernel layout is not what the source declares.

        BCC reuses whatever is pinned at the path without comparing (a changed
        struct would be read and written at the wrong size).
        """
        if self.node is None:
            return
        lib, mod = _bcc_tables(), self.bpf.module
        for pin in pinned(self.node):
            name = pin.encode()
            fd = lib.bpf_table_fd(mod, name)
            if fd < 0:  # pinned by another source, not used by this one
                continue
            got = map_info(fd)
            want = (
                lib.bpf_table_type(mod, name),
                lib.bpf_table_key_size(mod, name),
                lib.bpf_table_leaf_size(mod, name),
                lib.bpf_table_max_entries(mod, name),
            )
            have = (got.type, got.key_size, got.value_size, got.max_entries)
            if have != want:
                raise BPFUnavailable(
                    f"pinned map {os.path.join(pin_dir(self.node), pin)} has "
                    f"(type, key, value, max entries) {have}, the source declares {want}: "
                    f"migrate it or remove_pins({self.node!r}) (its entries are lost)"
                )

    def map(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def map_id(self, name: str) -> int:
        """The kernel's id of map `name` (the same across loads when it is pinned)."""
        return int(map_info(self.map(name).map_fd).id)

    def prog_id(self, name: str) -> int:
        return int(prog_info(self.fns[name].fd).id)

    def close(self) -> None:
        """Drop our handles; attached programs and pinned maps stay in the kernel."""
        if not self._closed:
            self._closed = True
            self.bpf.cleanup()


class TCPrograms(_Loaded):
    """One C source of tc (SCHED_CLS) programs, compiled and loaded; its maps by name."""

    def __init__(self, source: str, programs: tuple[str, ...], node: str | None = None) -> None:
        super().__init__(source, {name: (SCHED_CLS, -1) for name in programs}, node)

    def attach(self, ipr: Any, index: int, name: str) -> None:
        """Put program `name` on link `index`'s ingress, replacing corral's previous one."""
        with contextlib.suppress(NetlinkError):
            ipr.tc("add", "clsact", index)  # EEXIST when it is there already
        ipr.tc(
            "replace-filter",
            "bpf",
            index,
            HANDLE,
            fd=self.fns[name].fd,
            name=name,
            parent=INGRESS,
            prio=PRIO,
            classid=1,
            direct_action=True,
        )


# ------------------------------------------------------------------ cgroups


@dataclass(frozen=True)
class CgroupProgram:
    """A program attached directly to a cgroup (not inherited from a parent)."""

    id: int
    name: str
    hook: str  # a key of HOOKS

    @property
    def ours(self) -> bool:
        return self.name.startswith(CGROUP_PREFIX)


def _cgroup_fd(path: str, attaching: bool) -> int:
    """An O_DIRECTORY fd on cgroup2 directory `path`; attaching refuses a cgroup2 root."""
    real = os.path.realpath(path)
    try:
        kind = _statfs_type(real)
    except OSError as e:
        raise CgroupError(f"no cgroup at {path}: {e.strerror}") from e
    if kind != CGROUP2_SUPER_MAGIC:
        raise CgroupError(f"{path} is not a cgroup2 directory (cgroup2 is at {CGROUP2_ROOT})")
    if attaching and (real == CGROUP2_ROOT or os.path.ismount(real)):
        raise CgroupError(
            f"refusing to attach to the root cgroup2 directory {real}: it would reach every "
            f"process on the machine; attach to the node's own cgroup (e.g. {real}/corral-<node>)"
        )
    return os.open(real, os.O_RDONLY | os.O_DIRECTORY)


def _query(cg: int, attach: int) -> list[int]:
    """Ids of the programs attached directly to the cgroup at this attach type."""
    lib, size = _bpf(), 64  # BPF_CGROUP_MAX_PROGS
    while True:
        ids = (ctypes.c_uint32 * size)()
        cnt, flags = ctypes.c_uint32(size), ctypes.c_uint32(0)
        rc = lib.bpf_prog_query(cg, attach, 0, ctypes.byref(flags), ids, ctypes.byref(cnt))
        if rc == -errno.ENOSPC:
            size *= 4
            continue
        _check(rc, "BPF_PROG_QUERY")
        return list(ids[: cnt.value])


@contextlib.contextmanager
def _prog_by_id(prog_id: int) -> Any:
    fd = _bpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        raise OSError(-fd, f"program {prog_id}: {os.strerror(-fd)}")
    try:
        yield fd
    finally:
        os.close(fd)


def _programs_at(cg: int, hook: str) -> list[CgroupProgram]:
    out = []
    for pid in _query(cg, HOOKS[hook][1]):
        try:
            with _prog_by_id(pid) as fd:
                name = prog_info(fd).name.decode()
        except OSError:  # detached and freed since the query
            continue
        out.append(CgroupProgram(pid, name, hook))
    return out


def cgroup_programs(cgroup: str, everyone: bool = False) -> list[CgroupProgram]:
    """corral's programs attached to `cgroup` on every hook (`everyone`: all programs)."""
    cg = _cgroup_fd(cgroup, attaching=False)
    try:
        progs = [p for hook in HOOKS for p in _programs_at(cg, hook)]
    finally:
        os.close(cg)
    return progs if everyone else [p for p in progs if p.ours]


def detach_cgroup(
    cgroup: str, names: Iterable[str] | None = None, ids: Iterable[int] | None = None
) -> list[CgroupProgram]:
    """Detach corral's programs from `cgroup`: all of them, or those named or with these ids.

    An id that is not a corral program attached there is refused before
    anything is detached; nobody else's program is ever touched.
    """
    want_names = set(names) if names is not None else None
    want_ids = set(ids) if ids is not None else None
    everyone = cgroup_programs(cgroup, everyone=True)
    if want_ids is not None:
        known = {p.id: p for p in everyone}
        bad = [i for i in sorted(want_ids) if i not in known or not known[i].ours]
        if bad:
            raise CgroupError(f"programs {bad} are not corral programs attached to {cgroup}")
    chosen = [
        p
        for p in everyone
        if p.ours
        and (want_names is None or p.name in want_names)
        and (want_ids is None or p.id in want_ids)
    ]
    cg = _cgroup_fd(cgroup, attaching=False)
    try:
        for p in chosen:
            with _prog_by_id(p.id) as fd:
                rc = _bpf().bpf_prog_detach2(fd, cg, HOOKS[p.hook][1])
            if rc < 0 and -rc != errno.ENOENT:  # ENOENT: someone detached it meanwhile
                raise CgroupError(f"detach {p.name} ({p.id}) from {cgroup}: {os.strerror(-rc)}")
    finally:
        os.close(cg)
    return chosen


class CgroupPrograms(_Loaded):
    """One C source of cgroup programs (sock_addr, sock, skb), loaded for named hooks.

    `programs` maps each function to its hook, e.g. {"corral_connect4":
    "connect4"}. Function names start with `corral_` and fit the kernel's 15
    characters: that name is how a later load or a cleanup finds them.
    """

    def __init__(
        self,
        source: str,
        programs: Mapping[str, str],
        node: str | None = None,
        cflags: Iterable[str] = (),
    ) -> None:
        for name, hook in programs.items():
            if not name.startswith(CGROUP_PREFIX) or len(name) > NAME_MAX:
                raise ValueError(
                    f"cgroup program {name!r}: name it {CGROUP_PREFIX}... in at most "
                    f"{NAME_MAX} characters (the kernel keeps 15; the prefix marks corral's)"
                )
            if hook not in HOOKS:
                raise ValueError(
                    f"cgroup program {name!r}: unknown hook {hook!r} ({sorted(HOOKS)})"
                )
        self.hooks = dict(programs)
        super().__init__(source, {n: HOOKS[h] for n, h in programs.items()}, node, cflags)

    def attach(self, cgroup: str, name: str) -> str:
        """Attach `name` to `cgroup` on its hook; "attached", "replaced" or "unchanged".

        BPF_F_ALLOW_MULTI, so other programs on the hook stay and run too. A
        corral program of the same name already there (an earlier load) is
        swapped for this one by BPF_F_REPLACE in one syscall: connections
        made meanwhile see either the old program or the new, never none.
        """
        fn, hook = self.fns[name], self.hooks[name]
        attach, mine = HOOKS[hook][1], self.prog_id(name)
        cg = _cgroup_fd(cgroup, attaching=True)
        try:
            old = [p for p in _programs_at(cg, hook) if p.name == name]
            if any(p.id == mine for p in old):
                stale, result = [p for p in old if p.id != mine], "unchanged"
            elif old:
                with _prog_by_id(old[0].id) as old_fd:
                    opts = _AttachOpts(ctypes.sizeof(_AttachOpts), 0, old_fd)
                    opts.flags = BPF_F_ALLOW_MULTI | BPF_F_REPLACE
                    rc = _bpf().bpf_prog_attach_opts(fn.fd, cg, attach, ctypes.byref(opts))
                stale, result = old[1:], "replaced"
            else:
                opts = _AttachOpts(ctypes.sizeof(_AttachOpts), BPF_F_ALLOW_MULTI, 0)
                rc = _bpf().bpf_prog_attach_opts(fn.fd, cg, attach, ctypes.byref(opts))
                stale, result = [], "attached"
            if result != "unchanged" and rc < 0:
                hint = " (a program there without BPF_F_ALLOW_MULTI?)" if -rc == errno.EPERM else ""
                raise CgroupError(f"attach {name} to {cgroup} ({hook}): {os.strerror(-rc)}{hint}")
            for p in stale:  # duplicates of ours, from a crash between attach and replace
                with _prog_by_id(p.id) as fd:
                    _bpf().bpf_prog_detach2(fd, cg, attach)
        finally:
            os.close(cg)
        return result

    def detach(self, cgroup: str, name: str) -> bool:
        """Detach corral's program `name` from `cgroup`, whichever load put it there."""
        return bool(detach_cgroup(cgroup, names=[name]))


# ------------------------------------------------------------------ batch map updates


def _as(cls: Any, v: Any) -> Any:
    return v if isinstance(v, cls) else cls(v)


def _array(cls: Any, values: list[Any]) -> Any:
    """A ctypes array of `cls` from instances or plain values (ints, for scalar types).

    Plain values go straight into the array: making a ctypes object per
    entry first costs more than the syscall itself.
    """
    try:
        return (cls * len(values))(*values)
    except TypeError:
        return (cls * len(values))(*(_as(cls, v) for v in values))


def _batch_call(fn: Any, *args: Any) -> tuple[int, int]:
    """(error or 0, count done) of a libbcc batch call over `n` = args[-1] entries."""
    cnt = args[-1]
    rc = fn(*args[:-1], ctypes.byref(cnt))
    if rc == 0:
        return 0, cnt.value
    return (-rc if rc < 0 else ctypes.get_errno()), cnt.value


def _unsupported(err: int, done: int) -> bool:
    # ENOTSUPP: no batch op for this map type; EINVAL before anything: an old kernel
    return err in (ENOTSUPP, errno.EOPNOTSUPP) or (err == errno.EINVAL and done == 0)


def _percpu(table: Any) -> bool:
    from bcc import table as t

    return isinstance(table, t.PerCpuHash | t.PerCpuArray | t.LruPerCpuHash)


def update_batch(table: Any, items: Iterable[tuple[Any, Any]], fallback: bool = True) -> str:
    """Write many (key, leaf) pairs in one BPF_MAP_UPDATE_BATCH; "batch" or "loop".

    Keys and leaves are the table's ctypes (`table.Key(...)`, `table.Leaf()`)
    or what those accept (ints). Map types or kernels without the batch
    syscall get one update per entry, unless `fallback` is False.
    """
    from bcc.libbcc import lib

    pairs = list(items)
    if not pairs:
        return "batch"
    if not _percpu(table):
        keys = _array(table.Key, [k for k, _ in pairs])
        leaves = _array(table.Leaf, [v for _, v in pairs])
        err, done = _batch_call(
            lib.bpf_update_batch, table.map_fd, ctypes.byref(keys), ctypes.byref(leaves),
            ctypes.c_uint32(len(pairs)),
        )  # fmt: skip
        if not err:
            return "batch"
        if not (fallback and _unsupported(err, done)):
            raise OSError(
                err, f"BPF_MAP_UPDATE_BATCH ({done}/{len(pairs)} done): {os.strerror(err)}"
            )
    elif not fallback:
        raise OSError(ENOTSUPP, "no batch updates of per-CPU maps here")
    for k, v in pairs:
        table[_as(table.Key, k)] = _as(table.Leaf, v)
    return "loop"


def delete_batch(table: Any, keys: Iterable[Any], fallback: bool = True) -> str:
    """Delete many keys in one BPF_MAP_DELETE_BATCH; keys not there are skipped.

    Array entries cannot be deleted: they are zeroed (as BCC's `del` does),
    which is one batch update.
    """
    from bcc import table as t
    from bcc.libbcc import lib

    ks = list(keys)
    if isinstance(table, t.ArrayBase):
        return update_batch(table, [(k, table.Leaf()) for k in ks], fallback)
    while ks:
        arr = _array(table.Key, ks)
        err, done = _batch_call(
            lib.bpf_delete_batch, table.map_fd, ctypes.byref(arr), ctypes.c_uint32(len(ks))
        )
        if not err:
            return "batch"
        if err == errno.ENOENT:  # keys[done] is not there: skip it, go on with the rest
            ks = ks[done + 1 :]
            continue
        if not (fallback and _unsupported(err, done)):
            raise OSError(err, f"BPF_MAP_DELETE_BATCH: {os.strerror(err)}")
        for k in ks:
            with contextlib.suppress(KeyError):
                del table[_as(table.Key, k)]
        return "loop"
    return "batch"


def attached(ipr: Any, index: int) -> list[str]:
    """Names of corral's tc programs on a link's ingress."""
    try:
        filters = ipr.get_filters(index=index, parent=INGRESS)
    except NetlinkError:
        return []
    out = []
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS") if f["info"] >> 16 == PRIO else None
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name:
            out.append(str(name).split(":")[0])
    return out


def detach_everywhere(ipr: Any) -> list[str]:
    """Take corral's tc programs off every link in the namespace; the links' names."""
    gone = []
    for link in ipr.get_links():
        if attached(ipr, link["index"]):
            try:
                ipr.tc("del-filter", "bpf", link["index"], HANDLE, parent=INGRESS, prio=PRIO)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                    raise
            gone.append(str(link.get_attr("IFLA_IFNAME")))
    return gone


def ip_key(ip: str) -> int:
    """An IPv4 address as the u32 whose memory holds it in network byte order."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def set_mac(field: Any, mac: str) -> None:
    """Fill a BCC `u8[6]` field from "aa:bb:..."."""
    for i, b in enumerate(bytes.fromhex(mac.replace(":", ""))):
        field[i] = b


def forget(table: Any, ip: str) -> None:
    """Delete the entry keyed by IPv4 `ip` from a BCC hash map, if it is there."""
    with contextlib.suppress(KeyError):
        del table[table.Key(ip_key(ip))]
