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
maps. `remove_pins(node)` removes them. Python reads and writes a load's maps
through `open_map(spec)`: a typed `pinned_map.BpfMap`, not BCC's tables.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from corral.ebpf import libbpf, pinned_map
from corral.node.cgroups import cgroup2_mount

HERE = os.path.dirname(os.path.abspath(__file__))
PRIO = 0xC0DE
HANDLE = 1
INGRESS = 0xFFFFFFF2  # clsact's ingress hook

BPFFS = "/sys/fs/bpf"
# Every node's pins live under one folder of bpffs. Several simulated nodes of one name on
# one machine (the overlay test bed, run by parallel test workers) each set their own.
PIN_ROOT = os.environ.get("CORRAL_BPF_ROOT") or os.path.join(BPFFS, "corral")
# The cgroup2 mount, from /proc/self/mountinfo: /sys/fs/cgroup/unified on a hybrid
# hierarchy (this machine), /sys/fs/cgroup on a unified one (node/cgroups.py).
CGROUP2_ROOT = cgroup2_mount() or "/sys/fs/cgroup"
CGROUP_PREFIX = "corral_"  # every corral cgroup program's name starts with it
NAME_MAX = 15  # BPF_OBJ_NAME_LEN - 1: the kernel keeps this much of a program's name

BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2

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


class PinLayoutError(BPFUnavailable):
    """Maps pinned for the node are laid out otherwise than the source declares them."""

    def __init__(self, directory: str, stale: Mapping[str, list[str]]) -> None:
        self.stale = dict(stale)  # map name -> what differs
        what = "; ".join(f"{directory}/{n}: {', '.join(d)}" for n, d in self.stale.items())
        node = os.path.basename(directory)
        super().__init__(
            f"pinned map {what} (the source declares otherwise): migrate it or "
            f"remove_pins({node!r}) (its entries are lost)"
        )


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


# ------------------------------------------------------------------ kernel objects


def prog_info(fd: int) -> libbpf.ProgInfo:
    return libbpf.obj_info(fd, libbpf.ProgInfo())


# ------------------------------------------------------------------ bpffs and pins


def ensure_bpffs(path: str = BPFFS) -> bool:
    """Mount the BPF filesystem at `path` unless it is there; True if this call mounted it.

    Mounts land in the caller's mount namespace and each mount is a new, empty
    bpffs: do this on the host before node mount namespaces are made (they
    copy the host's mounts), or pins made inside one die with it.
    """
    if bpffs_mounted(path):
        return False
    libbpf.mount("bpf", path, "bpf", "mode=0700")
    return True


def bpffs_mounted(path: str = BPFFS) -> bool:
    """Whether `path` is a BPF filesystem (OSError when it cannot be looked at)."""
    return libbpf.statfs_type(path) == BPF_FS_MAGIC


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
        """Refuse pinned maps whose kernel layout is not what the source declares.

        BCC reuses whatever is pinned at the path without comparing (a changed
        struct would be read and written at the wrong size).
        """
        if self.node is None:
            return
        lib, mod = libbpf.bcc_tables(), self.bpf.module
        stale: dict[str, list[str]] = {}
        for pin in pinned(self.node):
            name = pin.encode()
            fd = lib.bpf_table_fd(mod, name)
            if fd < 0:  # pinned by another source, not used by this one
                continue
            want = pinned_map.Layout(
                lib.bpf_table_type(mod, name),
                lib.bpf_table_key_size(mod, name),
                lib.bpf_table_leaf_size(mod, name),
                lib.bpf_table_max_entries(mod, name),
            )
            diff = want.differences(pinned_map.Layout.of_fd(fd))
            if diff:
                stale[pin] = diff
        if stale:
            raise PinLayoutError(pin_dir(self.node), stale)

    def map(self, name: str) -> Any:
        """BCC's table `name` (for what BpfMap does not do, e.g. BCC's own helpers)."""
        return self.bpf[name.encode()]

    def open_map(self, spec: pinned_map.MapSpec) -> pinned_map.BpfMap:
        """Map `spec.name` of this load as a BpfMap, its layout checked against `spec`."""
        where = os.path.join(pin_dir(self.node), spec.name) if self.node else spec.name
        return pinned_map.BpfMap.of_fd(self.map(spec.name).map_fd, spec, where)

    def map_id(self, name: str) -> int:
        """The kernel's id of map `name` (the same across loads when it is pinned)."""
        return int(pinned_map.info(self.map(name).map_fd).id)

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
        kind = libbpf.statfs_type(real)
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
    lib, size = libbpf.bpf(), 64  # BPF_CGROUP_MAX_PROGS
    while True:
        ids = (ctypes.c_uint32 * size)()
        cnt, flags = ctypes.c_uint32(size), ctypes.c_uint32(0)
        rc = lib.bpf_prog_query(cg, attach, 0, ctypes.byref(flags), ids, ctypes.byref(cnt))
        if rc == -errno.ENOSPC:
            size *= 4
            continue
        libbpf.check(rc, "BPF_PROG_QUERY")
        return list(ids[: cnt.value])


@contextlib.contextmanager
def _prog_by_id(prog_id: int) -> Any:
    fd = libbpf.bpf().bpf_prog_get_fd_by_id(prog_id)
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
    cgroup: str,
    names: Iterable[str] | None = None,
    ids: Iterable[int] | None = None,
    everyone: bool = False,
) -> list[CgroupProgram]:
    """Detach corral's programs from `cgroup`: all of them, or those named or with these ids.

    An id that is not a corral program attached there is refused before
    anything is detached; nobody else's program is touched unless `everyone`
    (for a cgroup the caller made itself, e.g. a test's).
    """
    want_names = set(names) if names is not None else None
    want_ids = set(ids) if ids is not None else None
    attached = cgroup_programs(cgroup, everyone=True)
    if want_ids is not None:
        known = {p.id: p for p in attached}
        bad = [i for i in sorted(want_ids) if i not in known or not known[i].ours]
        if bad:
            raise CgroupError(f"programs {bad} are not corral programs attached to {cgroup}")
    chosen = [
        p
        for p in attached
        if (p.ours or everyone)
        and (want_names is None or p.name in want_names)
        and (want_ids is None or p.id in want_ids)
    ]
    cg = _cgroup_fd(cgroup, attaching=False)
    try:
        for p in chosen:
            with _prog_by_id(p.id) as fd:
                rc = libbpf.bpf().bpf_prog_detach2(fd, cg, HOOKS[p.hook][1])
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
                    opts = libbpf.AttachOpts(ctypes.sizeof(libbpf.AttachOpts), 0, old_fd)
                    opts.flags = BPF_F_ALLOW_MULTI | BPF_F_REPLACE
                    rc = libbpf.bpf().bpf_prog_attach_opts(fn.fd, cg, attach, ctypes.byref(opts))
                stale, result = old[1:], "replaced"
            else:
                opts = libbpf.AttachOpts(ctypes.sizeof(libbpf.AttachOpts), BPF_F_ALLOW_MULTI, 0)
                rc = libbpf.bpf().bpf_prog_attach_opts(fn.fd, cg, attach, ctypes.byref(opts))
                stale, result = [], "attached"
            if result != "unchanged" and rc < 0:
                hint = " (a program there without BPF_F_ALLOW_MULTI?)" if -rc == errno.EPERM else ""
                raise CgroupError(f"attach {name} to {cgroup} ({hook}): {os.strerror(-rc)}{hint}")
            for p in stale:  # duplicates of ours, from a crash between attach and replace
                with _prog_by_id(p.id) as fd:
                    libbpf.bpf().bpf_prog_detach2(fd, cg, attach)
        finally:
            os.close(cg)
        return result

    def detach(self, cgroup: str, name: str) -> bool:
        """Detach corral's program `name` from `cgroup`, whichever load put it there."""
        return bool(detach_cgroup(cgroup, names=[name]))


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
