"""One packet -> one readable record: outer and inner addresses, VNI, protocol, ports."""

from __future__ import annotations

from typing import Any

VXLAN_PORT = 4789


def _l4(ip: Any) -> dict[str, Any]:
    from scapy.layers.inet import ICMP, TCP, UDP

    out: dict[str, Any] = {"src": ip.src, "dst": ip.dst, "proto": ip.proto, "len": ip.len}
    if TCP in ip:
        t = ip[TCP]
        out.update(proto="tcp", sport=t.sport, dport=t.dport, flags=str(t.flags))
    elif UDP in ip:
        u = ip[UDP]
        out.update(proto="udp", sport=u.sport, dport=u.dport)
    elif ICMP in ip:
        i = ip[ICMP]
        out.update(proto="icmp", type=i.type, code=i.code, id=getattr(i, "id", None))
    return out


def decode(pkt: Any, vxlan_port: int = VXLAN_PORT) -> dict[str, Any] | None:
    """A dict for an IPv4 packet (VXLAN decoded, inner and outer), None for anything else."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN

    if ARP in pkt:
        a = pkt[ARP]
        return {"arp": {"op": a.op, "psrc": a.psrc, "pdst": a.pdst, "hwsrc": a.hwsrc}}
    if IP not in pkt:
        return None
    ip = pkt[IP]
    if UDP in ip and vxlan_port in (ip[UDP].dport, ip[UDP].sport):
        udp = ip[UDP]
        vx = udp.payload
        if not isinstance(vx, VXLAN):
            vx = VXLAN(bytes(udp.payload))
        inner = vx.payload
        rec: dict[str, Any] = {
            "outer": {"src": ip.src, "dst": ip.dst, "sport": udp.sport, "dport": udp.dport},
            "vni": vx.vni,
        }
        if isinstance(inner, Ether):
            rec["innerMAC"] = {"src": inner.src, "dst": inner.dst}
            if IP in inner:
                rec["inner"] = _l4(inner[IP])
            elif ARP in inner:
                a = inner[ARP]
                rec["inner"] = {"proto": "arp", "src": a.psrc, "dst": a.pdst}
        return rec
    return {"inner": _l4(ip)}


def line(rec: dict[str, Any]) -> str:
    """One line per packet, tcpdump-like but with the overlay spelled out."""
    iface = rec.get("iface", "?")
    if "arp" in rec:
        a = rec["arp"]
        return (
            f"{iface:<16} ARP {'who-has' if a['op'] == 1 else 'is-at'} {a['pdst']} tell {a['psrc']}"
        )
    inner = rec.get("inner") or {}
    desc = _inner_text(inner)
    if "vni" in rec:
        o = rec["outer"]
        return f"{iface:<16} VXLAN vni {rec['vni']} {o['src']} > {o['dst']} | {desc}"
    return f"{iface:<16} {desc}"


def _inner_text(i: dict[str, Any]) -> str:
    if not i:
        return "(not IPv4)"
    p = i.get("proto")
    if p in ("tcp", "udp"):
        flags = f" [{i['flags']}]" if i.get("flags") else ""
        return f"{p.upper()} {i['src']}:{i['sport']} > {i['dst']}:{i['dport']}{flags}"
    if p == "icmp":
        kind = {8: "echo request", 0: "echo reply", 3: "unreachable"}.get(
            i.get("type"), f"type {i.get('type')}"
        )
        return f"ICMP {i['src']} > {i['dst']} {kind}" + (
            f" id {i['id']}" if i.get("id") is not None else ""
        )
    if p == "arp":
        return f"ARP {i['src']} > {i['dst']}"
    return f"IP proto {p} {i.get('src')} > {i.get('dst')}"


def matches(
    rec: dict[str, Any], src: str | None, dst: set[str] | None, sport: int | None = None
) -> bool:
    """Is this (decoded) packet the probe's: inner source/destination (and source port)?"""
    i = rec.get("inner") or {}
    if src is not None and i.get("src") != src:
        return False
    if dst is not None and i.get("dst") not in dst:
        return False
    return sport is None or i.get("sport") == sport or i.get("id") == sport
