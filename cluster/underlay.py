"""The underlay: one bridge in its own namespace joining the nodes and the host.

    host ns:      <name>-ul  (host_ip/prefix)  --veth-->  underlay ns: "host"
    underlay ns:  br0  <- host, n1, n2, ...
    node ns i:    eth0 (node ip/prefix; default route unreachable)  --veth-->  underlay ns: n<i>

Every function converges: it creates what is missing and leaves what exists.
All calls are blocking netlink (pyroute2); the CLI runs them directly.
"""

from __future__ import annotations

import contextlib
import ipaddress

from corral.node import netlink, netns

# pyroute2 costs ~0.2 s to import and every CLI command imports this module
# (through local_etcd_urls): import it only where netlink is used.


def _nl_errors() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


RTN_UNREACHABLE = 7
BRIDGE = "br0"
HOST_PEER = "host"
NODE_IF = "eth0"


def host_networks() -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, network) of every IPv4 address in the host namespace."""
    out = []
    with netlink.iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for a in ipr.get_addr(family=2):
            addr = a.get_attr("IFA_ADDRESS")
            net = ipaddress.ip_network(f"{addr}/{a['prefixlen']}", strict=False)
            out.append((names.get(a["index"], "?"), net))
    return out


def addresses(ifname: str) -> list[str]:
    """IPv4 addresses of a host-namespace interface ([] if there is none)."""
    with netlink.iproute() as ipr:
        idx = _link(ipr, ifname)
        if idx is None:
            return []
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, index=idx)]


def _link(ipr, name: str) -> int | None:  # type: ignore[no-untyped-def]
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _ensure_addr(ipr, idx: int, ip: str, prefixlen: int) -> None:  # type: ignore[no-untyped-def]
    have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
    if (ip, prefixlen) not in have:
        with contextlib.suppress(_nl_errors()):
            ipr.addr("add", index=idx, address=ip, prefixlen=prefixlen)


def ensure_bridge(ns: str) -> None:
    netns.add(ns)
    with netlink.iproute(ns) as ipr:
        lo = _link(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        if _link(ipr, BRIDGE) is None:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
        ipr.link("set", index=_link(ipr, BRIDGE), state="up")


def _attach(ipr, name: str) -> None:  # type: ignore[no-untyped-def]
    idx = _link(ipr, name)
    ipr.link("set", index=idx, master=_link(ipr, BRIDGE), state="up")


def ensure_host_link(underlay_ns: str, veth: str, host_ip: str, prefixlen: int) -> None:
    """The host's one veth into the underlay, holding the host's underlay address."""
    with netlink.iproute(underlay_ns) as uipr:
        if _link(uipr, HOST_PEER) is None:
            with netlink.iproute() as ipr:
                stale = _link(ipr, veth)
                if stale is not None:  # its peer is gone: a left-over of an old cluster
                    ipr.link("del", index=stale)
                ipr.link(
                    "add",
                    ifname=veth,
                    kind="veth",
                    peer={"ifname": HOST_PEER, "net_ns_fd": underlay_ns},
                )
        _attach(uipr, HOST_PEER)
    with netlink.iproute() as ipr:
        idx = _link(ipr, veth)
        if idx is None:
            raise RuntimeError(f"host interface {veth} is missing although its peer exists")
        _ensure_addr(ipr, idx, host_ip, prefixlen)
        ipr.link("set", index=idx, state="up")


def ensure_node_link(
    underlay_ns: str,
    node_ns: str,
    index: int,
    ip: str,
    prefixlen: int,
    default_via: str | None = None,
) -> None:
    """Node namespace with lo up and eth0 on the underlay. Its default route is
    unreachable, unless `default_via` names a router (a test's switch)."""
    netns.add(node_ns)
    peer = f"n{index}"
    with netlink.iproute(node_ns) as nipr:
        lo = _link(nipr, "lo")
        if lo is not None:
            nipr.link("set", index=lo, state="up")
        if _link(nipr, NODE_IF) is None:
            with netlink.iproute(underlay_ns) as uipr:
                if _link(uipr, peer) is not None:  # half of an old pair
                    uipr.link("del", index=_link(uipr, peer))
                uipr.link(
                    "add", ifname=peer, kind="veth", peer={"ifname": NODE_IF, "net_ns_fd": node_ns}
                )
        idx = _link(nipr, NODE_IF)
        _ensure_addr(nipr, idx, ip, prefixlen)
        nipr.link("set", index=idx, state="up")
        # No way out: the default route is unreachable, so nothing a node or pod
        # sends leaves the underlay (the host's ip_forward does not matter), and a
        # pod trying the internet fails at once ("no route to host").
        routes = nipr.get_routes(family=2, dst_len=0, table=254)
        with contextlib.suppress(_nl_errors()):
            if default_via is not None:
                if not [r for r in routes if r.get_attr("RTA_GATEWAY") == default_via]:
                    nipr.route("replace", dst="0.0.0.0/0", gateway=default_via)
            elif [r["type"] for r in routes] != [RTN_UNREACHABLE]:
                nipr.route("replace", dst="0.0.0.0/0", type="unreachable")
    with netlink.iproute(underlay_ns) as uipr:
        _attach(uipr, peer)


def remove_host_link(veth: str) -> bool:
    """Delete the host's underlay veth (its peer goes with it). True if there was one."""
    with netlink.iproute() as ipr:
        idx = _link(ipr, veth)
        if idx is None:
            return False
        link = ipr.get_links(idx)[0]
        linkinfo = link.get_attr("IFLA_LINKINFO")
        kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo else None
        if kind != "veth":  # not ours: never touch a host interface we did not make
            return False
        with contextlib.suppress(_nl_errors()):
            ipr.link("del", index=idx)
        return True
