"""Loading corral's BPF programs with BCC, and hanging them on tc hooks.

BCC compiles the C sources in this folder when a daemon starts (about half a
second of CPU each). It needs Debian's python3-bpfcc (exposed to the venv by
scripts/bootstrap.sh) and kernel headers at /lib/modules/$(uname -r)/build.
`unavailable()` says which is missing, so callers can fall back to a kernel
path and say why.

corral's tc programs sit on clsact ingress at one priority (`PRIO`) and
handle, so replacing one (a restarted daemon's fresh load) is atomic and
listing or removing them never touches anyone else's filters.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

HERE = os.path.dirname(os.path.abspath(__file__))
PRIO = 0xC0DE
HANDLE = 1
INGRESS = 0xFFFFFFF2  # clsact's ingress hook


class BPFUnavailable(RuntimeError):
    """BCC or the kernel headers are missing, or a program did not compile or load."""


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


class TCPrograms:
    """One C source of tc (SCHED_CLS) programs, compiled and loaded; its maps by name."""

    def __init__(self, source: str, programs: tuple[str, ...]) -> None:
        why = unavailable()
        if why:
            raise BPFUnavailable(why)
        from bcc import BPF

        path = os.path.join(HERE, source)
        try:
            self._bpf = BPF(src_file=path.encode())
            self.fns = {
                name: self._bpf.load_func(name.encode(), BPF.SCHED_CLS) for name in programs
            }
        except Exception as e:
            raise BPFUnavailable(f"cannot compile or load {path}: {e}") from e

    def map(self, name: str) -> Any:
        return self._bpf[name]

    def close(self) -> None:
        """Drop our handles; attached programs stay in the kernel until replaced."""
        self._bpf.cleanup()

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
