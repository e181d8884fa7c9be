"""The overlay's eBPF fast path: what it is told and where it is attached.

The programs (ebpf/overlay_fastpath.c) encapsulate pod-to-remote-pod packets
on the pod's own veth and send them out of the underlay interface, and
decapsulate VXLAN for local pods on the underlay interface and hand them
straight to the pod (bpf_redirect_peer): no cni0 bridge, no IP forwarding
and no corral.<VNI> device on the way. On the wire nothing changes: the
packets are the VXLAN a kernel-path node sends and takes, so nodes with and
without the fast path interoperate, and whatever the programs do not handle
falls through to the kernel's path unchanged.

Where the programs learn things:
- `config`: the cluster network, this node's lease, the underlay interface
  and address, VNI, port and VTEP MAC (from the overlay agent);
- `peers`: every remote lease reached by VXLAN (subnet -> underlay IP, VTEP
  MAC), the same set the agent programs into the kernel's FDB;
- `pods`: every local pod, read from the kernel itself: corral-cni tags a pod's
  host-side veth with the alias `corral-pod <IP> <pod MAC>`, so a restarted
  agent finds them without asking anyone.

Pod-to-pod packets on the fast path do not pass the node's netfilter hooks
(as with Cilium's BPF host routing); pod traffic to anything outside the
cluster network still does, and so do the outer VXLAN packets. Packets from
a service endpoint (the pinned `proxy_endpoints` map that `corral proxy
--mode iptables` fills) are left to the kernel too: they may be replies of a
flow the node's conntrack DNATed, which only the kernel path un-DNATs.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2.netlink.exceptions import NetlinkError

from corral.ebpf import loader
from corral.ebpf.loader import BPFUnavailable, unavailable
from corral.ebpf.pinned_map import (
    ARRAY,
    HASH,
    PERCPU_ARRAY,
    BpfMap,
    MapSpec,
    ip_key,
    ip_of,
    set_mac,
)
from corral.node.podveth import parse_pod_alias, pod_extra_source


class Remote(Protocol):
    """A peer node as the fast path needs it (the overlay's vxlan.Remote fits)."""

    subnet: str
    public_ip: str
    vtep_mac: str

    @property
    def gateway(self) -> str: ...


__all__ = ["BPFUnavailable", "FastPath", "Settings", "unavailable"]

SOURCE = "overlay_fastpath.c"
PROGRAMS = ("from_pod", "from_uplink", "from_overlay")
STATS = ("encapsulated", "decapsulated", "local", "to_kernel")
# the programs' drop counters (stats slots after STATS), see corral.overlay.guard
DROPS = ("spoofed", "vxlan_from_pods", "vxlan_foreign", "not_ipv4")
IFF_UP = 1

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
MAC = u8 * 6


class Config(ctypes.Structure):
    """struct config of overlay_fastpath.c (addresses and port in network order)."""

    _fields_ = [
        *((n, u32) for n in ("cluster_net", "cluster_mask", "subnet", "subnet_mask")),
        *((n, u32) for n in ("uplink", "local_ip", "vni")),
        ("port", u16),
        ("vtep_mac", MAC),
    ]


class Pod(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("pod_mac", MAC), ("host_mac", MAC)]


class Peer(ctypes.Structure):
    _fields_ = [("ip", u32), ("nexthop", u32), ("vtep_mac", MAC), ("pad", u8 * 2)]


class Source(ctypes.Structure):
    _fields_ = [
        ("ip", u32), ("extra_net", u32), ("extra_mask", u32), ("mac", MAC), ("pad", u8 * 2),
    ]  # fmt: skip


SPECS = {
    s.name: s
    for s in (
        MapSpec("config", ARRAY, u32, Config, 1),
        MapSpec("pods", HASH, u32, Pod, 4096),
        MapSpec("peers", HASH, u32, Peer, 16384),
        MapSpec("veths", HASH, u32, Source, 4096),
        MapSpec("peer_ips", HASH, u32, u8, 16384),
        MapSpec("stats", PERCPU_ARRAY, u32, u64, 8),
    )
}


@dataclass(frozen=True)
class Settings:
    cluster: str  # the cluster network, e.g. 10.244.0.0/16
    subnet: str  # this node's lease
    uplink_index: int  # the underlay interface
    local_ip: str  # this node's underlay address
    vni: int
    port: int
    vtep_mac: str
    device_index: int  # corral.<VNI>


class FastPath:
    """The loaded programs and their maps, kept in step by the overlay agent.

    Methods that touch links take the agent's pyroute2 IPRoute (bound to the
    node's namespace) and run on the agent's netlink thread.
    """

    def __init__(self, node: str | None = None) -> None:
        # node: pin the maps the source declares CORRAL_PINNED (proxy_endpoints, which
        # corral proxy fills through ebpf/proxy_endpoints.py) under that node's pin dir
        self.node = node
        self.progs: loader.TCPrograms | None = None
        self.maps: dict[str, BpfMap] = {}
        self.settings: Settings | None = None
        self._peers: dict[str, Remote] = {}
        self._pods: dict[str, tuple[int, str, str]] = {}  # pod IP -> (ifindex, pod MAC, host MAC)
        self._sources: dict[int, tuple[str, str, str | None]] = {}  # ifindex -> (IP, MAC, extra)
        self._peer_ips: set[str] = set()
        self._extra: dict[int, str | None] = {}  # ifindex -> the alias's extra source prefix

    def load(self) -> None:
        """Compile and load the programs; BPFUnavailable says why not."""
        self.progs = loader.TCPrograms(SOURCE, PROGRAMS, node=self.node)
        try:
            self.maps = {name: self.progs.open_map(spec) for name, spec in SPECS.items()}
        except OSError as e:
            self.close()
            raise BPFUnavailable(f"fast path maps: {e}") from e

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}
        if self.progs is not None:
            self.progs.close()
            self.progs = None

    def _map(self, name: str) -> BpfMap:
        assert self.maps, "load() first"
        return self.maps[name]

    # ------------------------------------------------------------ maps

    def configure(self, s: Settings) -> None:
        net, sub = ipaddress.IPv4Network(s.cluster), ipaddress.IPv4Network(s.subnet)
        c = Config()
        c.cluster_net, c.cluster_mask = ip_key(str(net.network_address)), ip_key(str(net.netmask))
        c.subnet, c.subnet_mask = ip_key(str(sub.network_address)), ip_key(str(sub.netmask))
        c.uplink, c.local_ip, c.vni = s.uplink_index, ip_key(s.local_ip), s.vni
        c.port = socket.htons(s.port)
        set_mac(c.vtep_mac, s.vtep_mac)
        self._map("config").put(0, c)
        self.settings = s

    def sync_peers(self, remotes: list[Remote], on_link: Callable[[str], bool]) -> list[str]:
        """Make the peers map hold exactly `remotes`; what changed, for the log.

        `on_link(ip)` says whether a peer's underlay address is on-link: the
        programs then hand the packet to that neighbour directly instead of
        asking the FIB for a next hop (a route lookup per packet saved).
        """
        table = self._map("peers")
        want = {r.subnet: r for r in remotes}
        changes: list[str] = []
        for subnet, old in list(self._peers.items()):
            if subnet not in want:
                table.delete(ip_key(old.gateway))
                del self._peers[subnet]
                changes.append(f"fast path: peer {subnet} removed")
        for subnet, r in want.items():
            if self._peers.get(subnet) == r:
                continue
            v = Peer(ip_key(r.public_ip))
            v.nexthop = v.ip if on_link(r.public_ip) else 0
            set_mac(v.vtep_mac, r.vtep_mac)
            table.put(ip_key(r.gateway), v)
            self._peers[subnet] = r
            changes.append(f"fast path: peer {subnet} via {r.public_ip}")
        return changes

    def sync_peer_ips(self, ips: set[str]) -> list[str]:
        """Make `peer_ips` hold exactly `ips`: from_uplink drops VXLAN from anyone else."""
        table = self._map("peer_ips")
        changes: list[str] = []
        for ip in sorted(self._peer_ips - ips):
            table.delete(ip_key(ip))
            changes.append(f"fast path: VXLAN from {ip} no longer accepted")
        for ip in sorted(ips - self._peer_ips):
            table.put(ip_key(ip), 1)
            changes.append(f"fast path: VXLAN from {ip} accepted")
        self._peer_ips = set(ips)
        return changes

    def sync_pods(self, ipr: Any, verify: bool = False) -> list[str]:
        """Find every local pod's veth, hook from_pod onto each, and fill the pods map.

        Hooks are checked for new or changed pods; `verify` checks every pod's
        (the periodic pass: someone may have removed one by hand).
        """
        found = dict(e for link in ipr.get_links() if (e := self._pod_entry(link)))
        changes: list[str] = []
        for ip in [ip for ip in self._pods if ip not in found]:
            changes += self._drop_pod(ip)
        for ip, entry in found.items():
            changes += self._set_pod(ipr, ip, entry, verify)
        return changes

    def update_links(self, ipr: Any, indexes: set[int]) -> list[str]:
        """sync_pods for just these links (what link events named): no full dump."""
        changes: list[str] = []
        for index in indexes:
            try:
                links = ipr.get_links(index)
            except NetlinkError:  # gone
                links = []
            got = self._pod_entry(links[0]) if links else None
            for ip, entry in list(self._pods.items()):
                if entry[0] == index and (got is None or got[0] != ip):
                    changes += self._drop_pod(ip)
            if got is not None:
                changes += self._set_pod(ipr, got[0], got[1], verify=False)
        return changes

    def _pod_entry(self, link: Any) -> tuple[str, tuple[int, str, str]] | None:
        """(pod IP, (ifindex, pod MAC, host MAC)) for an up pod veth of our subnet."""
        assert self.settings is not None
        tag = parse_pod_alias(link.get_attr("IFLA_IFALIAS"))
        # DEL takes a pod's veth down before deleting it: down means gone
        if tag is None or not link["flags"] & IFF_UP:
            return None
        if ipaddress.IPv4Address(tag[0]) not in ipaddress.IPv4Network(self.settings.subnet):
            return None
        self._extra[link["index"]] = pod_extra_source(link.get_attr("IFLA_IFALIAS"))
        return tag[0], (link["index"], tag[1], str(link.get_attr("IFLA_ADDRESS")).lower())

    def _set_pod(self, ipr: Any, ip: str, entry: tuple[int, str, str], verify: bool) -> list[str]:
        assert self.progs is not None
        changes = []
        index, pod_mac, host_mac = entry
        known = self._pods.get(ip) == entry
        if not known:  # what the veth may send from, before from_pod goes on it
            changes += self._set_source(index, ip, pod_mac)
        if (verify or not known) and "from_pod" not in loader.attached(ipr, index):
            self.progs.attach(ipr, index, "from_pod")
            changes.append(f"fast path: from_pod attached for pod {ip}")
        if not known:
            v = Pod(index)
            set_mac(v.pod_mac, pod_mac)
            set_mac(v.host_mac, host_mac)
            self._map("pods").put(ip_key(ip), v)
            self._pods[ip] = entry
            changes.append(f"fast path: pod {ip} on ifindex {index}")
        return changes

    def _drop_pod(self, ip: str) -> list[str]:
        self._map("pods").delete(ip_key(ip))
        index = self._pods.pop(ip)[0]
        if self._sources.get(index, ("",))[0] == ip:
            del self._sources[index]
            self._map("veths").delete(index)
        return [f"fast path: pod {ip} removed"]

    def _set_source(self, index: int, ip: str, mac: str) -> list[str]:
        """from_pod drops what the veth sends from any other MAC or address (and non-IPv4)."""
        extra = self._extra.get(index)
        if self._sources.get(index) == (ip, mac, extra):
            return []
        v = Source(ip_key(ip))
        if extra:
            net = ipaddress.IPv4Network(extra)
            v.extra_net, v.extra_mask = ip_key(str(net.network_address)), ip_key(str(net.netmask))
        set_mac(v.mac, mac)
        self._map("veths").put(index, v)
        self._sources[index] = (ip, mac, extra)
        also = f" and {extra}" if extra else ""
        return [f"fast path: ifindex {index} may send only from {ip} {mac}{also}"]

    @property
    def pod_count(self) -> int:
        return len(self._pods)

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def stats(self) -> dict[str, int]:
        """Packets handled since load, summed over CPUs."""
        table = self._map("stats")
        return {name: sum(table.get(i)) for i, name in enumerate(STATS)}

    def drops(self) -> dict[str, int]:
        """Packets the programs dropped since load (spoofed, VXLAN...), summed over CPUs."""
        table = self._map("stats")
        return {name: sum(table.get(len(STATS) + i)) for i, name in enumerate(DROPS)}

    def describe(self) -> dict[str, Any]:
        """The programs' ids and the maps as the programs read them (for `corral net`)."""
        if self.progs is None or not self.maps:
            return {}
        progs: dict[str, int | None] = {}
        for name in PROGRAMS:
            try:
                progs[name] = self.progs.prog_id(name)
            except Exception:
                progs[name] = None
        peers = [
            {
                "gateway": ip_of(k),
                "underlayIP": ip_of(v.ip),
                "vtepMAC": _mac(v.vtep_mac),
                "nexthop": ip_of(v.nexthop) if v.nexthop else None,
            }
            for k, v in self._map("peers").items()
        ]
        pods = [
            {"ip": ip_of(k), "ifindex": int(v.ifindex), "podMAC": _mac(v.pod_mac)}
            for k, v in self._map("pods").items()
        ]
        return {
            "programs": progs,
            "peers": sorted(peers, key=lambda p: str(p["gateway"])),
            "pods": sorted(pods, key=lambda p: str(p["ip"])),
            "peerIPs": sorted(ip_of(k) for k in self._map("peer_ips")),
        }

    # ------------------------------------------------------------ hooks

    def attach_fixed(self, ipr: Any, replace: bool = False) -> list[str]:
        """from_uplink on the underlay interface, from_overlay on corral.<VNI>."""
        assert self.settings is not None and self.progs is not None
        changes = []
        for index, name in (
            (self.settings.uplink_index, "from_uplink"),
            (self.settings.device_index, "from_overlay"),
        ):
            if replace or name not in loader.attached(ipr, index):
                self.progs.attach(ipr, index, name)
                changes.append(f"fast path: {name} attached to ifindex {index}")
        return changes

    def attach_all(self, ipr: Any) -> list[str]:
        """Put this load's programs on every hook: a restart's fresh load replaces the old."""
        assert self.progs is not None
        changes = self.attach_fixed(ipr, replace=True)
        for index, _, _ in self._pods.values():
            self.progs.attach(ipr, index, "from_pod")
        if self._pods:
            changes.append(f"fast path: from_pod attached to {len(self._pods)} pod veth(s)")
        return changes


def _mac(raw: Any) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def detach_all(ipr: Any) -> list[str]:
    """Remove corral's programs from every link (the kernel path then carries everything)."""
    return [f"fast path: programs removed from {name}" for name in loader.detach_everywhere(ipr)]
