"""Netlink, in one place: how corral opens it in a namespace, and the packed fast path.

Two ways to talk rtnetlink, for two needs:

- `iproute(ns)`: pyroute2's IPRoute in namespace `ns` (None: the calling thread's
  own). Everything that reads or changes links, addresses, routes, neighbours,
  FDB and tc goes through it. The socket is made by a thread that entered the
  namespace for the call (`corral.node.netns.entered`), so nothing is forked and
  it is safe under asyncio (pyroute2's own `NetNS` forks a helper and signals
  it, and the child's signal reaches the parent's loop through the shared
  wakeup fd). Blocking: call it from a thread or an executor.
- `Socket(ns)`: a handful of requests packed with `struct`, sent in batches,
  for the CNI ADD/DEL hot path. pyroute2 costs ~1 ms of Python per request
  (message classes, an event loop per call); these cost microseconds, and a
  batch goes to the kernel in one sendmsg and comes back as one ack each. The
  kernel handles the messages of a batch in order, exactly as if sent one by
  one. Errors are raised as pyroute2's NetlinkError so callers handle both alike.

pyroute2 is imported only when used (~0.2 s): every CLI command imports modules
that import this one.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corral.node import netns

if TYPE_CHECKING:
    from pyroute2.netlink.exceptions import NetlinkError

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acks carry only the header of the failed request
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 17, 18, 20, 24
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_IFALIAS = 18, 28, 20
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_DATA = 1, 2, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4  # hairpin
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST = 1, 2, 4
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")


# ------------------------------------------------------------ opening netlink


def raw_socket(ns: str | None = None, protocol: int = NETLINK_ROUTE) -> socket.socket:
    """A netlink socket of `protocol` in namespace `ns` (None: this thread's own).

    Made by a thread that entered the namespace for the call: the socket keeps
    the namespace, no process is forked.
    """
    if not ns:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, protocol)
    with netns.entered(ns):
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, protocol)


def iproute(ns: str | None = None, sock: socket.socket | None = None) -> Any:
    """pyroute2's IPRoute in namespace `ns` (None: this thread's own); close it after use.

    `sock`: a `raw_socket(ns)` made beforehand, for a listener that must be woken
    from another thread (shutting the socket down ends its blocking read).
    """
    from pyroute2 import IPRoute

    if sock is None and not ns:
        return IPRoute()
    return IPRoute(use_socket=sock or raw_socket(ns))


def ipv4_addrs(ipr: Any, index: int) -> list[tuple[str, int]]:
    """(address, prefix length) of every IPv4 address on link `index`, through `ipr`."""
    return [
        (a.get("IFA_ADDRESS"), a["prefixlen"])
        for a in ipr.get_addr(family=socket.AF_INET, index=index)
    ]


def random_mac() -> str:
    """A random unicast, locally administered MAC (so a new link's MAC needs no read-back)."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


# ------------------------------------------------------------ the packed fast path


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _name(s: str) -> bytes:
    return s.encode() + b"\0"


def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


@dataclass
class Request:
    """One message of a batch: type, flags, body (after the netlink header)."""

    type: int
    flags: int
    body: bytes
    ignore: tuple[int, ...] = field(default=())  # errnos that count as success


def veth(
    name: str, mtu: int, mac: str, master: int, peer_name: str, peer_ns_fd: int, peer_mac: str
) -> Request:
    """Create a veth pair, this end up; the peer goes straight into another namespace.

    The peer cannot be brought up in this request (the kernel refuses, ENOTCONN).
    """
    peer = (
        _ifinfo()
        + attr(IFLA_IFNAME, _name(peer_name))
        + attr(IFLA_MTU, struct.pack("=I", mtu))
        + attr(IFLA_ADDRESS, _mac(peer_mac))
        + attr(IFLA_NET_NS_FD, struct.pack("=I", peer_ns_fd))
    )
    info = attr(IFLA_INFO_KIND, b"veth\0") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer))
    body = (
        _ifinfo(flags=IFF_UP, change=IFF_UP)
        + attr(IFLA_IFNAME, _name(name))
        + attr(IFLA_MTU, struct.pack("=I", mtu))
        + attr(IFLA_ADDRESS, _mac(mac))
        + attr(IFLA_MASTER, struct.pack("=I", master))
        + attr(IFLA_LINKINFO, info)
    )
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def set_alias(name: str, alias: str) -> Request:
    """Give link `name` an alias (the kernel ignores IFLA_IFALIAS when creating a link)."""
    return Request(
        RTM_NEWLINK,
        0,
        _ifinfo() + attr(IFLA_IFNAME, _name(name)) + attr(IFLA_IFALIAS, alias.encode() + b"\0"),
    )


def hairpin(name: str) -> Request:
    """Hairpin mode on the bridge port `name` (a port option, set through its master)."""
    info = attr(IFLA_INFO_SLAVE_DATA, attr(IFLA_BRPORT_MODE, b"\x01"))
    return Request(
        RTM_NEWLINK, 0, _ifinfo() + attr(IFLA_IFNAME, _name(name)) + attr(IFLA_LINKINFO, info)
    )


def link_up(name: str, ignore: tuple[int, ...] = ()) -> Request:
    return Request(
        RTM_NEWLINK,
        0,
        _ifinfo(flags=IFF_UP, change=IFF_UP) + attr(IFLA_IFNAME, _name(name)),
        ignore,
    )


def link_down(name: str) -> Request:
    return Request(RTM_NEWLINK, 0, _ifinfo(flags=0, change=IFF_UP) + attr(IFLA_IFNAME, _name(name)))


def del_link(index: int = 0, name: str | None = None) -> Request:
    """Delete a link by index, or by name when index is 0."""
    body = _ifinfo(index=index) + (attr(IFLA_IFNAME, _name(name)) if name else b"")
    return Request(RTM_DELLINK, 0, body)


def get_link(name: str) -> Request:
    return Request(RTM_GETLINK, 0, _ifinfo() + attr(IFLA_IFNAME, _name(name)))


def add_address(index: int, iface: ipaddress.IPv4Interface) -> Request:
    ip = iface.ip.packed
    body = (
        _IFADDR.pack(socket.AF_INET, iface.network.prefixlen, 0, 0, index)
        + attr(IFA_LOCAL, ip)
        + attr(IFA_ADDRESS, ip)
    )
    if iface.network.prefixlen < 31:
        body += attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
    return Request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)


def add_route(
    dst: ipaddress.IPv4Network,
    gateway: ipaddress.IPv4Address,
    oif: int,
    ignore: tuple[int, ...] = (),
) -> Request:
    body = _RTMSG.pack(
        socket.AF_INET, dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST, 0
    )
    if dst.prefixlen:
        body += attr(RTA_DST, dst.network_address.packed)
    body += attr(RTA_GATEWAY, gateway.packed) + attr(RTA_OIF, struct.pack("=I", oif))
    return Request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body, ignore)


class Socket:
    """The packed fast path: an rtnetlink socket in namespace `ns` (None: this thread's)."""

    def __init__(self, ns: str | None = None) -> None:
        if ns:
            with netns.entered(ns):
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        else:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.bind((0, 0))
        except OSError:
            self.sock.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batch(self, reqs: list[Request]) -> list[bytes | NetlinkError]:
        """Send every request at once; per request, its reply (b"" for a bare ack) or error.

        The kernel carries on after a failed request: callers that need "stop at the
        first failure" put only independent requests in one batch.
        """
        from pyroute2.netlink.exceptions import NetlinkError

        first = self.seq + 1
        out = bytearray()
        for r in reqs:
            self.seq += 1
            out += (
                _HDR.pack(
                    _HDR.size + len(r.body),
                    r.type,
                    NLM_F_REQUEST | NLM_F_ACK | r.flags,
                    self.seq,
                    0,
                )
                + r.body
            )
        self.sock.sendto(out, (0, 0))
        replies: dict[int, bytes] = {}
        results: dict[int, bytes | NetlinkError] = {}
        while len(results) < len(reqs):
            data = self.sock.recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, _, seq, _ = _HDR.unpack_from(data, off)
                if length < _HDR.size:
                    break
                body = data[off + _HDR.size : off + length]
                off += (length + 3) & ~3
                if not first <= seq <= self.seq:
                    continue  # left over from an earlier, interrupted batch
                i = seq - first
                if mtype != NLMSG_ERROR:
                    replies[i] = body
                    continue
                (code,) = struct.unpack_from("=i", body)
                if code and -code not in reqs[i].ignore:
                    results[i] = NetlinkError(-code)
                else:
                    results[i] = replies.get(i, b"")
        return [results[i] for i in range(len(reqs))]

    def call(self, reqs: list[Request]) -> list[bytes]:
        """batch(), raising the first error."""
        from pyroute2.netlink.exceptions import NetlinkError

        res = self.batch(reqs)
        for r in res:
            if isinstance(r, NetlinkError):
                raise r
        return [r for r in res if not isinstance(r, NetlinkError)]


def ifindex(reply: bytes) -> int:
    """The interface index in an RTM_NEWLINK reply."""
    return int(_IFINFO.unpack_from(reply)[2])
