"""Dropped flows, one log line each: the NFLOG side of NetworkPolicy.

For a pod whose namespace carries the annotation `corral.dev/log-dropped-flows:
"true"`, its default-deny chain sends a dropped packet to NFLOG group `GROUP`
first, at most once a minute per (source, destination, destination port)
(`hashlimit`), so a flow's retransmitted SYNs make one line, not one per
packet. The prefix names the direction and the pod (`I 10.244.1.5`). The
component reads the group on a netlink socket in the node's namespace
(nfnetlink_log: bind, copy the first bytes of each packet) and logs who was
dropped and by which policies.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from corral.node import netlink

ANNOTATION = "corral.dev/log-dropped-flows"
GROUP = 2740
HASHLIMIT = "corral-netpol"

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NFULA_CFG_CMD, NFULA_CFG_MODE = 1, 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
PROTOCOLS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP"}


def log_rule(direction_letter: str, ip: str) -> str:
    """The rule before a chain's DROP, as iptables-save spells it."""
    return (
        "-m hashlimit --hashlimit-upto 1/min --hashlimit-burst 1 "
        f"--hashlimit-mode srcip,dstip,dstport --hashlimit-name {HASHLIMIT} "
        f'-j NFLOG --nflog-prefix "{direction_letter} {ip}" --nflog-group {GROUP}'
    )


def enabled(annotations: dict[str, str]) -> bool:
    return annotations.get(ANNOTATION, "").lower() in ("true", "1", "yes", "on")


@dataclass(frozen=True)
class Dropped:
    direction: str  # Ingress or Egress
    pod_ip: str  # the pod whose policy dropped it
    src: str
    dst: str
    protocol: str
    dport: int | None


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    at = 0
    while at + 4 <= len(data):
        n, kind = struct.unpack_from("=HH", data, at)
        if n < 4:
            break
        out[kind & 0x3FFF] = data[at + 4 : at + n]
        at += (n + 3) & ~3
    return out


def parse_packet(body: bytes) -> Dropped | None:
    """One NFULNL_MSG_PACKET body (after the netlink header): who was dropped."""
    attrs = _attrs(body[4:])  # after struct nfgenmsg
    prefix = attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace")
    payload = attrs.get(NFULA_PAYLOAD, b"")
    letter, _, pod_ip = prefix.partition(" ")
    if letter not in ("I", "E") or len(payload) < 20 or payload[0] >> 4 != 4:
        return None
    ihl = (payload[0] & 0x0F) * 4
    proto = payload[9]
    src = str(ipaddress.IPv4Address(payload[12:16]))
    dst = str(ipaddress.IPv4Address(payload[16:20]))
    dport = None
    if proto in (6, 17, 132) and len(payload) >= ihl + 4:
        dport = struct.unpack_from("!H", payload, ihl + 2)[0]
    direction = "Ingress" if letter == "I" else "Egress"
    return Dropped(direction, pod_ip, src, dst, PROTOCOLS.get(proto, str(proto)), dport)


def parse(data: bytes) -> list[Dropped]:
    """Every dropped packet in one recv() of netlink messages."""
    out = []
    at = 0
    while at + _NLMSG.size <= len(data):
        n, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, at)
        if n < _NLMSG.size:
            break
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            d = parse_packet(data[at + _NLMSG.size : at + n])
            if d is not None:
                out.append(d)
        at += (n + 3) & ~3
    return out


def _config(group: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", group) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def open_listener(ns: str | None, group: int = GROUP, copy: int = 96) -> socket.socket:
    """A non-blocking netlink socket bound to NFLOG `group` in namespace `ns`."""
    sock = netlink.raw_socket(ns, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        cmd = netlink.attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
        mode = netlink.attr(NFULA_CFG_MODE, struct.pack("!IBB", copy, NFULNL_COPY_PACKET, 0))
        for seq, attrs in enumerate((cmd, mode), 1):
            sock.send(_config(group, attrs, seq))
            reply = sock.recv(4096)
            _, kind = struct.unpack_from("=IH", reply)
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("=i", reply, _NLMSG.size)[0]
                if err:
                    raise OSError(err, f"NFLOG group {group}: {os.strerror(err)}")
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise
