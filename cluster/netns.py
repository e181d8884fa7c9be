"""Network namespace helpers: the one way corral creates, enters and removes them.

Namespaces are named files under /run/netns (as `ip netns` makes them), so an
operator can inspect anything corral made with ordinary tools.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


def path(name: str) -> str:
    return name if name.startswith("/") else os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    p = path(name)
    if not os.path.exists(p):
        return False
    try:
        with open(p) as f:
            return _is_netns_fd(f.fileno())
    except OSError:
        return False


def _is_netns_fd(fd: int) -> bool:
    # NS_GET_NSTYPE ioctl would be exact; comparing with /proc/self/ns/net's
    # filesystem (nsfs) is enough to tell a namespace from a plain file.
    st, ref = os.fstat(fd), os.stat("/proc/self/ns/net")
    return st.st_dev == ref.st_dev


def add(name: str) -> None:
    """Create the named namespace (no-op if it already exists)."""
    from pyroute2 import netns as pnetns

    if exists(name):
        return
    with contextlib.suppress(FileExistsError):
        pnetns.create(name)


def remove(name: str) -> bool:
    """Remove the named namespace; True if there was one. Safe to repeat."""
    from pyroute2 import netns as pnetns

    p = path(name)
    if not os.path.exists(p):
        return False
    try:
        pnetns.remove(name)
    except OSError:
        # A stale file whose mount is gone: unlink what is left.
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", p], check=False, capture_output=True)
            os.unlink(p)
    return True


def list_names(prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def ipr(name: str):  # type: ignore[no-untyped-def]
    """A pyroute2 netlink socket inside namespace `name` (use as a context manager)."""
    from pyroute2 import NetNS

    return NetNS(path(name))


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with this thread inside namespace `name`.

    Sockets created in the body belong to that namespace and keep it after
    the thread returns. Serialised: only one thread switches at a time.
    """
    with _setns_lock, open("/proc/thread-self/ns/net") as back, open(path(name)) as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(back.fileno(), CLONE_NEWNET) != 0:  # pragma: no cover
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the original namespace: {os.strerror(err)}")


def command(name: str, argv: Sequence[str]) -> list[str]:
    """argv prefixed so it runs inside namespace `name`."""
    return ["nsenter", f"--net={path(name)}", "--", *argv]


def run(
    name: str, argv: Sequence[str], check: bool = True, timeout: float = 60, **kw: object
) -> subprocess.CompletedProcess:
    """Run a command inside namespace `name`, capturing text output."""
    return subprocess.run(
        command(name, argv), check=check, timeout=timeout, capture_output=True, text=True, **kw
    )  # type: ignore[call-overload]
