"""The VXLAN data path in one network namespace, through netlink (pyroute2).

Every method here is blocking and idempotent: it compares what the kernel has
with what is wanted and changes only the difference, so re-running it against
working state touches nothing. Call all methods of one `VxlanNetlink` from one
thread (pyroute2's sync API runs its own event loop).

Routes corral installs carry the routing protocol number RTPROT_CORRAL (`ip
route` shows `proto 77`), which is how stale ones are told apart from routes
anybody else made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from socket import AF_INET
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NUD_PERMANENT

from corral.node import netlink
from corral.node.podveth import POD_ALIAS_PREFIX
from corral.node.routes import MAIN_TABLE, RTNH_F_ONLINK, RTPROT_CORRAL
from corral.node.underlay import Underlay

log = logging.getLogger(__name__)

NTF_SELF = 2


class DeviceMissing(RuntimeError):
    """The VXLAN device is gone (a pass found it deleted); the next full pass makes it."""


@dataclass(frozen=True)
class Remote:
    """What a remote node's lease says the data path needs."""

    subnet: str
    public_ip: str
    vtep_mac: str

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.subnet).network_address)


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    vni: int
    port: int
    local_ip: str
    underlay_index: int
    mac: str
    mtu: int
    subnet: str  # this node's subnet; the device gets its .0/32


class VxlanNetlink:
    """The VXLAN device and its per-peer entries, over one netlink socket in
    `namespace` (a name under /run/netns or a path; None: this thread's own)."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self._sock: Any = None

    @property
    def ipr(self) -> Any:
        if self._sock is None:
            self._sock = netlink.iproute(self.namespace)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._sock.close()
            self._sock = None

    # ------------------------------------------------------------ lookups

    def link_index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def device_mac(self, name: str) -> str | None:
        index = self.link_index(name)
        if index is None:
            return None
        return self.ipr.get_links(index)[0].get("IFLA_ADDRESS")

    # ------------------------------------------------------------ the device

    def _device_matches(self, link: Any, spec: DeviceSpec) -> bool:
        info = link.get("IFLA_LINKINFO")
        if info is None or info.get("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get("IFLA_INFO_DATA")
        return (
            data.get("IFLA_VXLAN_ID") == spec.vni
            and data.get("IFLA_VXLAN_LOCAL") == spec.local_ip
            and data.get("IFLA_VXLAN_PORT") == spec.port
            and data.get("IFLA_VXLAN_LEARNING") == 0
            and data.get("IFLA_VXLAN_LINK") == spec.underlay_index
        )

    def ensure_device(self, spec: DeviceSpec) -> list[str]:
        """Create or repair the VXLAN device; returns what had to change."""
        changes: list[str] = []
        index = self.link_index(spec.name)
        if index is not None and not self._device_matches(self.ipr.get_links(index)[0], spec):
            self.ipr.link("del", index=index)
            changes.append(f"recreated {spec.name} (its VXLAN settings were not ours)")
            index = None
        if index is None:
            self.ipr.link(
                "add",
                ifname=spec.name,
                kind="vxlan",
                vxlan_id=spec.vni,
                vxlan_local=spec.local_ip,
                vxlan_port=spec.port,
                vxlan_learning=0,
                vxlan_link=spec.underlay_index,
                address=spec.mac,
                mtu=spec.mtu,
                vxlan_udp_csum=0,
            )
            index = self.link_index(spec.name)
            if not changes:
                changes.append(f"created {spec.name}")
        link = self.ipr.get_links(index)[0]
        if link.get("IFLA_ADDRESS") != spec.mac:
            self.ipr.link("set", index=index, address=spec.mac)
            changes.append(f"restored VTEP MAC {spec.mac} (was {link.get('IFLA_ADDRESS')})")
        if link.get("IFLA_MTU") != spec.mtu:
            self.ipr.link("set", index=index, mtu=spec.mtu)
            changes.append(f"set MTU {spec.mtu} (was {link.get('IFLA_MTU')})")
        if not link["flags"] & 1:  # IFF_UP
            self.ipr.link("set", index=index, state="up")
            changes.append(f"set {spec.name} up")
        want = str(ipaddress.ip_network(spec.subnet).network_address)
        have = netlink.ipv4_addrs(self.ipr, index)
        for addr, plen in have:
            if (addr, plen) != (want, 32):
                self.ipr.addr("del", index=index, address=addr, prefixlen=plen)
                changes.append(f"removed address {addr}/{plen}")
        if (want, 32) not in have:
            self.ipr.addr("add", index=index, address=want, prefixlen=32)
            changes.append(f"added address {want}/32")
        return changes

    # ------------------------------------------------------------ per-remote entries

    def sync_remotes(
        self, device: str, remotes: list[Remote], underlay: Underlay, direct_routing: bool = False
    ) -> list[str]:
        """Make neighbours, FDB and routes exactly those `remotes` need; returns the changes.

        Added in the order neighbour, FDB, route (a route never points at an
        unresolvable next hop) and removed in the reverse order.
        """
        index = self.link_index(device)
        if index is None:
            raise DeviceMissing(f"device {device} is missing")
        changes: list[str] = []
        encap = [r for r in remotes if not (direct_routing and underlay.on_link(r.public_ip))]
        direct = [r for r in remotes if r not in encap]

        want_neigh = {r.gateway: r.vtep_mac for r in encap}
        want_fdb = {r.vtep_mac: r.public_ip for r in encap}
        want_route: dict[str, tuple[str, int, bool]] = {
            r.subnet: (r.gateway, index, True) for r in encap
        }
        want_route.update({r.subnet: (r.public_ip, underlay.index, False) for r in direct})

        have_neigh = {
            n.get("NDA_DST"): (n.get("NDA_LLADDR"), n["state"])
            for n in self.ipr.get_neighbours(family=AF_INET, ifindex=index)
            if n["ifindex"] == index
        }
        have_fdb: dict[str, list[str]] = {}
        for f in self.ipr.fdb("dump", ifindex=index):
            if f["ifindex"] == index and f.get("NDA_DST"):
                have_fdb.setdefault(f.get("NDA_LLADDR"), []).append(f.get("NDA_DST"))
        have_route: dict[str, tuple[str, int, bool]] = {}
        for r in self.ipr.get_routes(family=AF_INET, table=MAIN_TABLE):
            if r["proto"] == RTPROT_CORRAL:
                dst = f"{r.get('RTA_DST')}/{r['dst_len']}"
                have_route[dst] = (
                    r.get("RTA_GATEWAY"),
                    r.get("RTA_OIF"),
                    bool(r["flags"] & RTNH_F_ONLINK),
                )

        # removals first (routes, FDB, neighbours), so a changed MAC never has two entries
        for dst, (gw, oif, _) in have_route.items():
            if dst not in want_route:
                self._quiet(
                    self.ipr.route, "del", dst=dst, gateway=gw, oif=oif, proto=RTPROT_CORRAL
                )
                changes.append(f"removed route {dst}")
        for mac, dsts in have_fdb.items():
            for d in dsts:
                if want_fdb.get(mac) != d:
                    self._quiet(self.ipr.fdb, "del", ifindex=index, lladdr=mac, dst=d)
                    changes.append(f"removed FDB {mac} -> {d}")
        for dst, (mac, _) in have_neigh.items():
            if dst not in want_neigh:
                self._quiet(self.ipr.neigh, "del", dst=dst, lladdr=mac, ifindex=index)
                changes.append(f"removed neighbour {dst}")

        for r in encap:
            if have_neigh.get(r.gateway) != (r.vtep_mac, NUD_PERMANENT):
                self.ipr.neigh(
                    "replace", dst=r.gateway, lladdr=r.vtep_mac, ifindex=index, state=NUD_PERMANENT
                )
                changes.append(f"set neighbour {r.gateway} -> {r.vtep_mac}")
            if have_fdb.get(r.vtep_mac) != [r.public_ip]:
                self.ipr.fdb(
                    "replace",
                    ifindex=index,
                    lladdr=r.vtep_mac,
                    dst=r.public_ip,
                    state=NUD_PERMANENT,
                    flags=NTF_SELF,
                )
                changes.append(f"set FDB {r.vtep_mac} -> {r.public_ip}")
        for dst, (gw, oif, onlink) in want_route.items():
            if have_route.get(dst) != (gw, oif, onlink):
                self.ipr.route(
                    "replace",
                    dst=dst,
                    gateway=gw,
                    oif=oif,
                    proto=RTPROT_CORRAL,
                    flags=RTNH_F_ONLINK if onlink else 0,
                )
                changes.append(f"set route {dst} via {gw}{' onlink' if onlink else ''}")
        return changes

    def update_remote(
        self,
        device: str,
        old: Remote | None,
        new: Remote | None,
        underlay: Underlay,
        direct_routing: bool = False,
    ) -> list[str]:
        """The fast path for one changed lease: touch only that peer's entries.

        `old` is what the lease said before (None if it is new), `new` what it
        says now (None if it is gone). The periodic full sync catches anything
        this misses.
        """
        index = self.link_index(device)
        if index is None:
            raise DeviceMissing(f"device {device} is missing")
        changes: list[str] = []

        def direct(r: Remote) -> bool:
            return direct_routing and underlay.on_link(r.public_ip)

        if old is not None and old != new:
            if new is None or new.subnet != old.subnet:
                self._quiet(self.ipr.route, "del", dst=old.subnet, proto=RTPROT_CORRAL)
                changes.append(f"removed route {old.subnet}")
            if not direct(old) and (
                new is None
                or direct(new)
                or (new.vtep_mac, new.public_ip) != (old.vtep_mac, old.public_ip)
            ):
                self._quiet(
                    self.ipr.fdb, "del", ifindex=index, lladdr=old.vtep_mac, dst=old.public_ip
                )
                changes.append(f"removed FDB {old.vtep_mac} -> {old.public_ip}")
            if not direct(old) and (new is None or direct(new) or new.gateway != old.gateway):
                self._quiet(
                    self.ipr.neigh, "del", dst=old.gateway, lladdr=old.vtep_mac, ifindex=index
                )
                changes.append(f"removed neighbour {old.gateway}")
        if new is not None and new != old:
            if direct(new):
                self.ipr.route(
                    "replace",
                    dst=new.subnet,
                    gateway=new.public_ip,
                    oif=underlay.index,
                    proto=RTPROT_CORRAL,
                )
                changes.append(f"set route {new.subnet} via {new.public_ip}")
            else:
                self.ipr.neigh(
                    "replace",
                    dst=new.gateway,
                    lladdr=new.vtep_mac,
                    ifindex=index,
                    state=NUD_PERMANENT,
                )
                self.ipr.fdb(
                    "replace",
                    ifindex=index,
                    lladdr=new.vtep_mac,
                    dst=new.public_ip,
                    state=NUD_PERMANENT,
                    flags=NTF_SELF,
                )
                self.ipr.route(
                    "replace",
                    dst=new.subnet,
                    gateway=new.gateway,
                    oif=index,
                    proto=RTPROT_CORRAL,
                    flags=RTNH_F_ONLINK,
                )
                changes += [
                    f"set neighbour {new.gateway} -> {new.vtep_mac}",
                    f"set FDB {new.vtep_mac} -> {new.public_ip}",
                    f"set route {new.subnet} via {new.gateway} onlink",
                ]
        return changes

    @staticmethod
    def _quiet(fn: Any, *args: Any, **kw: Any) -> None:
        """A delete that may race with someone else's: gone already is fine."""
        try:
            fn(*args, **kw)
        except NetlinkError as e:
            if e.code not in (2, 3, 19, 22):  # ENOENT, ESRCH, ENODEV, EINVAL
                raise

    # ------------------------------------------------------------ inspection

    def snapshot(self, device: str) -> dict[str, Any]:
        """The overlay's kernel state, comparable between two points in time."""
        index = self.link_index(device)
        out: dict[str, Any] = {"device": None, "neighbours": [], "fdb": [], "routes": []}
        if index is None:
            return out
        link = self.ipr.get_links(index)[0]
        data = link.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")
        out["device"] = {
            "index": index,
            "mac": link.get("IFLA_ADDRESS"),
            "mtu": link.get("IFLA_MTU"),
            "up": bool(link["flags"] & 1),
            "vni": data.get("IFLA_VXLAN_ID"),
            "local": data.get("IFLA_VXLAN_LOCAL"),
            "port": data.get("IFLA_VXLAN_PORT"),
            "learning": data.get("IFLA_VXLAN_LEARNING"),
            "addresses": sorted(f"{a}/{p}" for a, p in netlink.ipv4_addrs(self.ipr, index)),
        }
        out["neighbours"] = sorted(
            (n.get("NDA_DST"), n.get("NDA_LLADDR"), n["state"])
            for n in self.ipr.get_neighbours(family=AF_INET, ifindex=index)
            if n["ifindex"] == index
        )
        out["fdb"] = sorted(
            (f.get("NDA_LLADDR"), f.get("NDA_DST"))
            for f in self.ipr.fdb("dump", ifindex=index)
            if f["ifindex"] == index and f.get("NDA_DST")
        )
        out["routes"] = sorted(
            (
                f"{r.get('RTA_DST')}/{r['dst_len']}",
                r.get("RTA_GATEWAY"),
                r.get("RTA_OIF"),
                bool(r["flags"] & RTNH_F_ONLINK),
            )
            for r in self.ipr.get_routes(family=AF_INET, table=MAIN_TABLE)
            if r["proto"] == RTPROT_CORRAL
        )
        return out


class EventMonitor:
    """Calls `on_damage(kind, key)` when netlink reports a change to what the overlay owns.

    kind/key: ("link", device), ("neighbour", ip), ("fdb", mac), ("route", cidr),
    ("pod", ifindex) for any change to a pod's veth.

    Listens (on a thread of its own) for link, neighbour/FDB and IPv4 route
    events in the namespace and reports: the device deleted or changed, a
    neighbour or FDB entry on the device deleted, a corral route deleted.
    (Entries added by hand are left to the periodic pass: every lease the
    agent programs would otherwise report itself.) Reporting our own changes
    is harmless: a pass that finds nothing to do changes nothing.
    """

    def __init__(
        self, namespace: str | None, device: str, on_damage: Callable[[str, str], None]
    ) -> None:
        self.namespace = namespace
        self.device = device
        self.on_damage = on_damage
        self._stopped = threading.Event()
        self._sock: Any = None
        self.index: int | None = None
        self._thread = threading.Thread(target=self._run, name="corral-overlay-events", daemon=True)

    def start(self, index: int | None) -> None:
        """Start listening; `index` is the device's current ifindex."""
        self.index = index
        self._raw = netlink.raw_socket(self.namespace)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(Exception):
            self._raw.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH

        self._sock = netlink.iproute(sock=self._raw)  # made and used on this thread only
        self._sock.bind(groups=RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE)
        index = self.index
        while not self._stopped.is_set():
            try:
                msgs = self._sock.get()
            except Exception:
                if self._stopped.is_set():
                    return
                log.warning(
                    "netlink event monitor failed; repairs fall back to the periodic pass",
                    exc_info=True,
                )
                return
            for msg in msgs:
                event = msg.get("event", "")
                if event in ("RTM_NEWLINK", "RTM_DELLINK"):
                    alias = msg.get("IFLA_IFALIAS")
                    if alias and alias.startswith(POD_ALIAS_PREFIX):
                        self.on_damage("pod", str(msg["index"]))
                    elif msg.get("IFLA_IFNAME") == self.device:
                        index = msg["index"]
                        self.on_damage("link", self.device)
                elif event == "RTM_DELNEIGH":
                    if index is not None and msg["ifindex"] == index:
                        if msg["family"] == socket.AF_BRIDGE:
                            self.on_damage("fdb", str(msg.get("NDA_LLADDR")))
                        else:
                            self.on_damage("neighbour", str(msg.get("NDA_DST")))
                elif event == "RTM_DELROUTE" and msg["proto"] == RTPROT_CORRAL:
                    self.on_damage("route", f"{msg.get('RTA_DST')}/{msg['dst_len']}")
