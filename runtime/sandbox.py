"""Pod sandboxes: a network namespace bind-mounted at <netns_dir>/cni-<uuid>
(as containerd makes them), plus the pod's resolv.conf and /etc/hosts.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import uuid

from corral.cluster.netns import CLONE_NEWNET

_libc = ctypes.CDLL(None, use_errno=True)
MS_BIND = 0x1000
MNT_DETACH = 2
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def new_netns_path(netns_dir: str) -> str:
    return os.path.join(netns_dir, f"cni-{uuid.uuid4()}")


def create_netns(path: str) -> None:
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
            raise _err("unshare(CLONE_NEWNET)")
        try:
            if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None) != 0:
                raise _err(f"bind mount of the new namespace onto {path}")
            _loopback_up()
        finally:
            if _libc.setns(back, CLONE_NEWNET) != 0:  # pragma: no cover
                raise _err("setns back to the node namespace")
    except BaseException:
        remove_netns(path)
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


def is_netns(path: str) -> bool:
    try:
        st, ref = os.stat(path), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return st.st_dev == ref.st_dev


def remove_netns(path: str) -> None:
    """Unmount and unlink; safe to repeat. The namespace dies with its last user."""
    for _ in range(3):
        if _libc.umount2(path.encode(), MNT_DETACH) != 0:
            break
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def resolv_conf(
    namespace: str,
    cluster_dns: str,
    domain: str,
    dns_policy: str = "ClusterFirst",
    host_resolv: str = "/etc/resolv.conf",
) -> str:
    if dns_policy == "Default":
        try:
            with open(host_resolv) as f:
                return f.read()
        except OSError:
            return ""
    if dns_policy == "None":
        return ""
    return (
        f"nameserver {cluster_dns}\n"
        f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
        "options ndots:5\n"
    )


def etc_hosts(
    pod_ip: str | None, hostname: str, subdomain: str | None, namespace: str, domain: str
) -> str:
    lines = [
        "# Kubernetes-managed hosts file (written by corral).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    if pod_ip:
        if subdomain:
            lines.append(f"{pod_ip}\t{hostname}.{subdomain}.{namespace}.svc.{domain}\t{hostname}")
        else:
            lines.append(f"{pod_ip}\t{hostname}")
    return "\n".join(lines) + "\n"
