"""Least privilege: a daemon keeps only the capabilities it uses.

`drop_to(keep)` shrinks the bounding set, then sets the permitted, effective and
inheritable sets to `keep` and clears the ambient set, and sets no_new_privs, so
neither the daemon nor anything it executes can regain what it gave up. Call it
first thing, before any thread exists: capabilities are per thread, and threads
made later (gRPC's, executors') inherit the set of the thread that made them.

What each daemon keeps (README lists the same):

    scheduler, controllers,  nothing: they only talk to etcd over TCP (the API server
    apiserver                also serves HTTPS on an unprivileged port, 6443)
    dns                      NET_BIND_SERVICE (port 53)
    proxy                    NET_ADMIN (netfilter, ipset, conntrack, the service
                             route, the bridge sysctl), NET_RAW (legacy iptables'
                             raw socket), BPF (the fast path's pinned map);
                             --mode ebpf also SYS_ADMIN (cgroup programs by id)
    node                     everything: it makes sandboxes (namespaces, mounts,
                             cgroups), programs netlink, iptables and BPF, and
                             must be able to grant a privileged pod all of it
"""

from __future__ import annotations

import ctypes
import os

from corral.api.objects import CAPABILITIES  # by bit number

KEEP: dict[str, frozenset[str] | None] = {
    "scheduler": frozenset(),
    "controllers": frozenset(),
    "apiserver": frozenset(),
    "node": None,  # None: keep all
    "proxy": frozenset({"NET_ADMIN", "NET_RAW", "BPF"}),
    "dns": frozenset({"NET_BIND_SERVICE"}),  # port 53; it only reads etcd and answers
    # + SYS_ADMIN: finding programs on a cgroup by id (BPF_PROG_GET_FD_BY_ID) needs it
    "proxy-ebpf": frozenset({"NET_ADMIN", "NET_RAW", "BPF", "SYS_ADMIN"}),
}

PR_CAPBSET_READ, PR_CAPBSET_DROP = 23, 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mask(names: frozenset[str] | set[str]) -> int:
    unknown = set(names) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities: {', '.join(sorted(unknown))}")
    return sum(1 << CAPABILITIES.index(n) for n in names)


def drop_to(keep: frozenset[str] | set[str]) -> None:
    """Keep only `keep` (names without CAP_), in every set, for good."""
    want = mask(keep)
    for bit in range(len(CAPABILITIES)):
        if not want & (1 << bit) and _libc.prctl(PR_CAPBSET_READ, bit, 0, 0, 0) == 1:
            _check(_libc.prctl(PR_CAPBSET_DROP, bit, 0, 0, 0), f"dropping CAP_{CAPABILITIES[bit]}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # absent on old kernels
    data = (_Data * 2)()
    for i in range(2):
        part = (want >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = part
    header = _Header(_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")


def apply(daemon: str) -> None:
    """The least-privilege set of `daemon` (see KEEP); no-op unless running as root."""
    keep = KEEP.get(daemon)
    if keep is None or os.geteuid() != 0:
        return
    drop_to(keep)


def effective() -> int:
    """This process's effective capability mask (from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0
