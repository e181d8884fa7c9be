"""Mounts the node makes for its pods (tmpfs for secrets and memory-backed emptyDirs),
and finding mounts in /proc/self/mountinfo (also the cgroup2 hierarchy's)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class MountInfo:
    mount_point: str
    fstype: str
    source: str
    root: str
    super_options: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    """Every mount of this process's mount namespace, in mount order."""
    out = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if "-" not in fields or len(fields) < 5:
                continue  # not a mount line
            sep = fields.index("-")
            out.append(
                MountInfo(
                    mount_point=_unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    root=_unescape(fields[3]),
                    super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                )
            )
    return out


def fstype(path: str) -> str | None:
    """The filesystem type of the mount `path` is on (the last mount covering it)."""
    real = os.path.realpath(path)
    best: MountInfo | None = None
    for m in mountinfo():
        mp = m.mount_point
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mount_point)
        ):
            best = m
    return best.fstype if best else None


def is_mount(path: str) -> bool:
    real = os.path.realpath(path)
    return any(m.mount_point == real for m in mountinfo())


def mount_tmpfs(path: str, size: int | None = None, mode: int = 0o755) -> None:
    """A fresh tmpfs on `path` (nosuid, nodev); `size` in bytes caps it."""
    opts = f"mode={mode:o}" + (f",size={size}" if size else "")
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount tmpfs on {path}: {os.strerror(e)}")


def unmount_under(path: str) -> list[str]:
    """Detach every mount at or below `path`, deepest first; the mount points detached."""
    real = os.path.realpath(path).rstrip("/")
    points = sorted(
        {
            m.mount_point
            for m in mountinfo()
            if m.mount_point == real or m.mount_point.startswith(real + "/")
        },
        key=len,
        reverse=True,
    )
    for p in points:
        while _libc.umount2(p.encode(), MNT_DETACH) == 0:
            pass  # stacked mounts: until none is left
    return points
