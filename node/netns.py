"""Network namespace helpers: the one way corral creates, enters and removes them.

Namespaces are named files under /run/netns (as `ip netns` makes them), so an
operator can inspect anything corral made with ordinary tools. Netlink inside a
namespace: `corral.node.netlink`; sysctls: `corral.node.sysctl`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 2
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
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


def _errno(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def create_pinned(path: str) -> None:
    """Make a new network namespace pinned at `path`, with lo up. Blocking (use an executor).

    The calling thread unshares into a fresh namespace, bind-mounts it onto
    `path` and returns to where it was; other threads are not affected.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise _errno("unshare(CLONE_NEWNET)")
        try:
            if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None) != 0:
                raise _errno(f"bind mount of the new namespace onto {path}")
            _loopback_up()
        finally:
            if _libc.setns(back, CLONE_NEWNET) != 0:  # pragma: no cover
                raise _errno("setns back to the node namespace")
    except BaseException:
        remove_pinned(path)
        raise
    finally:
        os.close(back)


CLONE_NEWIPC = 0x08000000


def create_pinned_ipc(path: str) -> None:
    """A new IPC namespace pinned at `path` (a pod's, shared by its containers, as the
    pause container's is). Blocking; the calling thread returns to its own."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    back = os.open("/proc/thread-self/ns/ipc", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWIPC) != 0:
            raise _errno("unshare(CLONE_NEWIPC)")
        try:
            if _libc.mount(b"/proc/thread-self/ns/ipc", path.encode(), None, MS_BIND, None) != 0:
                raise _errno(f"bind mount of the new IPC namespace onto {path}")
        finally:
            if _libc.setns(back, CLONE_NEWIPC) != 0:  # pragma: no cover
                raise _errno("setns back to the node's IPC namespace")
    except BaseException:
        remove_pinned(path)
        raise
    finally:
        os.close(back)


def _loopback_up() -> None:
    """`lo` up in this thread's namespace: one SIOCSIFFLAGS ioctl on a socket made here.

    (A netlink socket from pyroute2 would do the same at ~20 ms and much CPU per pod,
    which dominates sandbox creation when many pods start at once.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifr)[:18])[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def remove_pinned(path: str) -> None:
    """Unmount and unlink; safe to repeat. The namespace dies with its last user."""
    for _ in range(3):
        if _libc.umount2(path.encode(), MNT_DETACH) != 0:
            break
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def list_names(prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def enter_thread(name: str | None) -> None:
    """Move the calling thread into namespace `name` for good (thread-pool initializers).

    Everything the thread creates afterwards (sockets, links) belongs there.
    """
    if not name:
        return
    with open(path(name)) as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")


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
