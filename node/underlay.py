"""The node's underlay: the interface and IPv4 address node-to-node traffic leaves by.

Found through netlink as given (an interface name or an address), else from the
IPv4 default route. The node agent needs it before anything starts (its HTTP
server binds to the address); the overlay needs its index, MTU and networks too.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from socket import AF_INET
from typing import Any

from corral.node.netlink import ipv4_addrs
from corral.node.routes import MAIN_TABLE


class UnderlayError(RuntimeError):
    """No usable underlay (no such interface, no address, no default route); says why."""


@dataclass(frozen=True)
class Underlay:
    iface: str
    index: int
    ip: str
    mtu: int
    networks: tuple[str, ...]

    def on_link(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(n) for n in self.networks)


def find(ipr: Any, iface: str | None = None, ip: str | None = None) -> Underlay:
    """The underlay as given by `iface` or `ip`, or the default route's, through `ipr`
    (`corral.node.netlink.iproute`, in the node's namespace). Blocking."""
    index: int | None = None
    if iface:
        found = ipr.link_lookup(ifname=iface)
        if not found:
            raise UnderlayError(f"underlay interface {iface!r} does not exist")
        index = found[0]
    elif ip:
        for a in ipr.get_addr(family=AF_INET):
            if a.get("IFA_ADDRESS") == ip:
                index = a["index"]
        if index is None:
            raise UnderlayError(f"no interface has the underlay address {ip}")
    else:
        for r in ipr.get_routes(family=AF_INET, table=MAIN_TABLE):
            if r["dst_len"] == 0 and r.get("RTA_OIF"):
                index = r.get("RTA_OIF")
                break
        if index is None:
            raise UnderlayError(
                "there is no IPv4 default route to find the underlay "
                "interface from; name it with --underlay-iface"
            )
    link = ipr.get_links(index)[0]
    name = link.get("IFLA_IFNAME")
    addrs = ipv4_addrs(ipr, index)
    if ip is None:
        if not addrs:
            raise UnderlayError(f"underlay interface {name} has no IPv4 address")
        ip = addrs[0][0]
    elif ip not in [a for a, _ in addrs]:
        raise UnderlayError(f"underlay interface {name} does not have the address {ip}")
    nets = tuple(str(ipaddress.ip_interface(f"{a}/{p}").network) for a, p in addrs)
    return Underlay(name, index, ip, link.get("IFLA_MTU"), nets)
