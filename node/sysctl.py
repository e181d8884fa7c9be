"""Kernel parameters under /proc/sys: read, write, ensure, in a network namespace if asked.

Names are written as sysctl(8) writes them (`net.ipv4.ip_forward`) or as paths
below /proc/sys (`net/ipv4/conf/eth0.100/forwarding`): as in containernetworking's
`pkg/utils/sysctl`, the first separator says which, and with dots the dots and
slashes swap (so an interface name with a dot survives).

/proc/sys/net follows the network namespace of the thread that opens the file:
with `ns` given the file is opened by this thread inside it
(`corral.node.netns.entered`); without, in the calling thread's own namespace
(a pool thread that entered its node's namespace needs nothing more).
Blocking (a setns and a file): daemons call it from an executor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from corral.node import netns

PROC_SYS = "/proc/sys"


def path(name: str) -> str:
    """The file under /proc/sys for `name` (dotted or slashed)."""
    dot, slash = name.find("."), name.find("/")
    if dot != -1 and (slash == -1 or dot < slash):
        name = name.translate(str.maketrans("./", "/."))
    return os.path.join(PROC_SYS, name)


@contextlib.contextmanager
def _inside(ns: str | None) -> Iterator[None]:
    if ns:
        with netns.entered(ns):
            yield
    else:
        yield


def read(name: str, ns: str | None = None) -> str:
    """The value, without its trailing newline."""
    with _inside(ns), open(path(name)) as f:
        return f.read().rstrip("\n")


def write(name: str, value: str, ns: str | None = None) -> None:
    with _inside(ns), open(path(name), "w") as f:
        f.write(value)


def ensure(name: str, value: str, ns: str | None = None) -> bool:
    """Set `name` to `value` unless it already is; True if it had to change."""
    with _inside(ns):
        if read(name) == value:
            return False
        write(name, value)
        return True
