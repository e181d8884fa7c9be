"""`corral net check`: etcd against each node's own view; every difference with its repair.

The checks are a table: one `Compared` entry per compared thing (overlay routes,
neighbours, FDB entries, stale ones, the VXLAN device's attributes, fast-path
programs and maps, the proxy's chains and jumps, IPAM leaks, ...), each saying
how to read etcd's side and the node's side (both keyed alike), how to compare
one key's two values, and how to repair a difference. `check()` walks the table.

A `Finding` is one difference: where (node, area), what etcd wants and what the
node has, the command that repairs it and how `--fix` applies it:

- `kernel`: the command runs on the node (an `ip`/`bridge` command): it works
  even when the node agent is down;
- `resync-node` / `resync-proxy`: the daemon owns the state (fast-path programs
  and maps, the proxy's chains and sets), so its debug socket is asked for a full
  repair pass (`corral net resync`);
- `release`: a leaked IP allocation; the CLI deletes its two etcd keys in one
  transaction, only if they are unchanged since it looked;
- None: not safe to repair blind (a duplicate IP, an orphan veth that might
  still carry a container): reported, left to the operator.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Generic, Literal, Protocol, TypeVar

from corral.api.netconfig import VXLAN_OVERHEAD
from corral.api.objects import SubnetLease
from corral.netdebug.model import Allocation, ClusterView
from corral.proxy import rules as R

LEAK_GRACE = 30.0  # seconds: a younger allocation may be an ADD in flight


@dataclass
class Finding:
    node: str | None  # None: cluster-wide (etcd)
    area: str  # node, overlay, fastpath, proxy, ipam
    what: str  # one line: what differs
    want: str = ""
    have: str = ""
    fix: str | None = None  # the command that repairs it, as an operator pastes it
    how: str | None = None  # kernel, resync-node, resync-proxy, release; None: left alone
    argv: list[str] | None = None  # for `kernel`: the command run on the node
    key: str | None = None  # for `release`: the allocation's IP key

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("argv")
        return d


@dataclass
class NodeDumps:
    node: dict[str, Any] | None = None
    proxy: dict[str, Any] | None = None
    node_error: str | None = None
    proxy_error: str | None = None


def _component(dump: dict[str, Any] | None, name: str) -> dict[str, Any]:
    if not dump:
        return {}
    return (dump.get("components", {}).get(name) or {}).get("debug") or {}


def pod_veths(dump: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """pod IP -> its host-side veth (the pod-veth alias), from the node agent's links."""
    out = {}
    for link in _component(dump, "overlay").get("links", []):
        if link.get("pod"):
            out[link["pod"]["ip"]] = link
    return out


# ------------------------------------------------------------ the table's shape


@dataclass(frozen=True)
class Diff:
    """How one key's two sides differ: the finding's text."""

    what: str
    want: str = ""
    have: str = ""


@dataclass(frozen=True)
class Repair:
    how: str | None = None  # as Finding.how
    argv: list[str] | None = None
    fix: str | None = None
    key: str | None = None


class Side(Protocol):
    """What the entries read: one node's dumps with etcd, or the whole cluster."""

    def node_of(self, key: Any) -> str | None: ...

    @property
    def pending(self) -> str: ...


S = TypeVar("S", bound=Side)


def _itself(key: Any) -> Any:
    return key


@dataclass(frozen=True)
class Compared(Generic[S]):
    """One compared thing. `want` reads etcd's side and `have` the node's, as mappings
    keyed alike (`want` returns None where etcd asks nothing of this thing, e.g. the
    neighbours under direct routing); `walk` says whose keys are walked: etcd's (what
    is missing or wrong on the node) or the node's (what etcd does not account for:
    stale entries). `match` turns a walked key into the other side's key when the two
    differ in detail. `compare(key, wanted, had)` is pure (either value may be None)
    and returns the difference or None; `fix` says how to repair it."""

    name: str
    area: str
    want: Callable[[S], Mapping[Any, Any] | None]
    have: Callable[[S], Mapping[Any, Any]]
    compare: Callable[[Any, Any, Any], Diff | None]
    fix: Callable[[S, Any, Any, Any], Repair]
    walk: Literal["want", "have"] = "want"
    match: Callable[[Any], Any] = _itself
    pending: bool = False  # the proxy's changes not programmed yet may explain it: say so

    def findings(self, side: S) -> list[Finding]:
        want = self.want(side)
        if want is None:
            return []
        have = self.have(side)
        if self.walk == "want":
            pairs = [(k, w, have.get(self.match(k))) for k, w in want.items()]
        else:
            pairs = [(k, want.get(self.match(k)), h) for k, h in have.items()]
        out = []
        for k, w, h in pairs:
            d = self.compare(k, w, h)
            if d is None:
                continue
            r = self.fix(side, k, w, h)
            what = d.what + (side.pending if self.pending else "")
            out.append(
                Finding(
                    side.node_of(k), self.area, what, d.want, d.have, r.fix, r.how, r.argv, r.key
                )
            )
        return out


def run_table(table: Iterable[Compared[S]], side: S) -> list[Finding]:
    return [f for entry in table for f in entry.findings(side)]


# ------------------------------------------------------------ one node's side


@dataclass
class NodeSide:
    """One node's dump (the node agent's or the proxy's) next to etcd's view."""

    cv: ClusterView
    node: str
    dump: dict[str, Any]
    dev: str = ""

    def node_of(self, key: Any) -> str | None:
        return self.node

    @cached_property
    def ov(self) -> dict[str, Any]:
        return _component(self.dump, "overlay")

    @cached_property
    def kernel(self) -> dict[str, Any]:
        return self.ov.get("kernel", {})

    @property
    def device(self) -> dict[str, Any]:
        return self.kernel.get("device") or {}

    @cached_property
    def own(self) -> SubnetLease | None:
        return self.cv.lease_of(self.node)

    @cached_property
    def remotes(self) -> list[SubnetLease]:
        """Other nodes' leases, by subnet."""
        others = [x for x in self.cv.leases.values() if x.node_name != self.node]
        return sorted(others, key=lambda x: ipaddress.ip_network(x.subnet))

    @property
    def direct(self) -> bool:
        return self.cv.spec.backend.direct_routing

    @cached_property
    def links(self) -> dict[str, dict[str, Any]]:
        return {link["name"]: link for link in self.ov.get("links", [])}

    @cached_property
    def pod_links(self) -> dict[str, dict[str, Any]]:
        """Up pod veths in this node's subnet, by name (another pool's are not ours)."""
        out = {}
        for name, link in self.links.items():
            pod = link.get("pod")
            if pod is None or not link.get("up"):
                continue
            if self.own is not None and ipaddress.ip_address(pod["ip"]) not in (
                ipaddress.ip_network(self.own.subnet)
            ):
                continue
            out[name] = link
        return out

    @property
    def maps(self) -> dict[str, Any]:
        return self.ov.get("fastpathMaps") or {}

    @cached_property
    def px(self) -> dict[str, Any]:
        return _component(self.dump, "proxy")

    def nat(self, part: str = "chains") -> dict[str, list[str]]:
        return ((self.px.get("kernel") or {}).get("nat") or {}).get(part, {})

    @property
    def filter_chains(self) -> dict[str, list[str]]:
        return ((self.px.get("kernel") or {}).get("filter") or {}).get("chains", {})

    @cached_property
    def service_rules(self) -> dict[str, R.ServiceRules]:
        return dict(sorted(expected_rules(self.cv).items()))

    @property
    def pending(self) -> str:
        n = self.px.get("pending")
        return f" ({n} change(s) not programmed yet)" if n else ""


def _gw(lease: SubnetLease) -> str:
    return str(ipaddress.ip_network(lease.subnet).network_address)


def _kernel(template: str) -> Callable[[NodeSide, Any, Any, Any], Repair]:
    """A repair that is one command run on the node: `template`'s words, formatted with
    the key `k`, etcd's value `w`, the node's `h` and the VXLAN device `dev`."""

    def repair(s: NodeSide, k: Any, w: Any, h: Any) -> Repair:
        return Repair("kernel", [x.format(k=k, w=w, h=h, dev=s.dev) for x in template.split()])

    return repair


def _resync_node(s: NodeSide, *_: Any) -> Repair:
    return Repair("resync-node", fix=f"corral net resync {s.node}")


def _resync_proxy(s: NodeSide, *_: Any) -> Repair:
    return Repair("resync-proxy", fix=f"corral net resync {s.node} --daemon proxy")


# ------------------------------------------------------------ overlay


def _device_identity(dev: str, w: tuple, h: tuple) -> Diff | None:
    if w == h:
        return None
    return Diff(
        f"{dev} is VNI {h[0]} port {h[1]} local {h[2]}; "
        f"etcd says VNI {w[0]} port {w[1]} local {w[2]}",
        want=f"vni {w[0]} port {w[1]} local {w[2]}",
        have=f"vni {h[0]} port {h[1]} local {h[2]}",
    )


def _want_identity(s: NodeSide) -> dict[str, tuple]:
    b = s.cv.spec.backend
    local = str(s.own.public_ip) if s.own is not None else s.device.get("local")
    return {s.dev: (b.vni, b.port, local)}


def _mtu(dev: str, w: int, h: Any) -> Diff | None:
    if h == w:
        return None
    return Diff(f"{dev} MTU is {h}, the network config asks {w}", want=str(w), have=str(h))


def _want_mtu(s: NodeSide) -> dict[str, int]:
    return {s.dev: s.cv.spec.backend.mtu or ((s.ov.get("underlayMTU") or 1500) - VXLAN_OVERHEAD)}


def _vtep_mac(dev: str, w: str, h: str) -> Diff | None:
    if h.lower() == w.lower():
        return None
    return Diff(f"{dev} VTEP MAC {h} is not the lease's {w}", want=w, have=h)


def _differs(label: str, want: str, now: str | None, verb: str = "is") -> Diff:
    """`LABEL missing` or `LABEL is NOW` (the node's value), with both sides' text."""
    return Diff(f"{label} " + (f"{verb} {now}" if now else "missing"), want, now or "none")


def _route(subnet: str, w: tuple[str, str, str], h: dict | None) -> Diff | None:
    gw, dev, who = w
    if h is not None and h.get("gateway") == gw and h.get("dev") == dev:
        return None
    now = None if h is None else f"via {h.get('gateway')} dev {h.get('dev')}"
    return _differs(f"route to {subnet} ({who})", f"{subnet} via {gw} dev {dev} onlink", now)


def _neighbour(gw: str, w: tuple[str, str], h: dict | None) -> Diff | None:
    mac, who = w
    if h is not None and str(h.get("mac")).lower() == mac and h.get("state") == "permanent":
        return None
    now = None if h is None else f"{h.get('mac')} {h.get('state')}"
    return _differs(f"neighbour {gw} ({who}'s VTEP)", f"{gw} lladdr {mac} permanent", now)


def _fdb(mac: str, w: tuple[str, str], h: list[str] | None) -> Diff | None:
    dst, who = w
    if h == [dst]:
        return None
    now = ", ".join(h or [])
    return _differs(f"FDB entry {mac} -> {dst} ({who})", f"{mac} dst {dst}", now, "points at")


def _fdb_by_mac(s: NodeSide) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in s.kernel.get("fdb", []):
        out.setdefault(str(f["mac"]).lower(), []).append(f["dst"])
    return out


def _stale(text: Callable[[Any, Any], str]) -> Callable[[Any, Any, Any], Diff | None]:
    """An entry the node has and etcd does not account for."""
    return lambda k, w, h: Diff(text(k, h)) if w is None else None


def _tunnelled(s: NodeSide) -> dict[str, SubnetLease] | None:
    """The other nodes' leases, by gateway: None under direct routing (then the agent
    decides per peer whether to tunnel, and neighbours and FDB are not checked)."""
    return None if s.direct else {_gw(r): r for r in s.remotes}


OVERLAY: tuple[Compared[NodeSide], ...] = (
    Compared(
        "VXLAN device identity",
        "overlay",
        _want_identity,
        lambda s: {s.dev: (s.device.get("vni"), s.device.get("port"), s.device.get("local"))},
        _device_identity,
        _resync_node,
    ),
    Compared(
        "VXLAN device MTU",
        "overlay",
        _want_mtu,
        lambda s: {s.dev: s.device.get("mtu")},
        _mtu,
        _kernel("ip link set dev {k} mtu {w}"),
    ),
    Compared(
        "VXLAN device up",
        "overlay",
        lambda s: {s.dev: True},
        lambda s: {s.dev: bool(s.device.get("up"))},
        lambda dev, w, h: None if h else Diff(f"{dev} is down"),
        _kernel("ip link set {k} up"),
    ),
    Compared(
        "VTEP MAC",
        "overlay",
        lambda s: {s.dev: s.own.vtep_mac} if s.own is not None and s.own.vtep_mac else {},
        lambda s: {s.dev: str(s.device.get("mac"))},
        _vtep_mac,
        _kernel("ip link set dev {k} address {w}"),
    ),
    Compared(
        "VXLAN device address",
        "overlay",
        lambda s: {s.dev: f"{_gw(s.own)}/32"} if s.own is not None else {},
        lambda s: {s.dev: s.device.get("addresses", [])},
        lambda dev, w, h: None if w in h else Diff(f"{dev} lacks its address {w}"),
        _kernel("ip addr add {w} dev {k}"),
    ),
    Compared(
        "routes to other nodes' subnets",
        "overlay",
        lambda s: None if s.direct else {r.subnet: (_gw(r), s.dev, r.node_name) for r in s.remotes},
        lambda s: {r["dst"]: r for r in s.kernel.get("routes", [])},
        _route,
        _kernel("ip route replace {k} via {w[0]} dev {w[1]} onlink proto 77"),
    ),
    Compared(
        "neighbours (other nodes' VTEPs)",
        "overlay",
        lambda s: (
            None
            if s.direct
            else {_gw(r): ((r.vtep_mac or "").lower(), r.node_name) for r in s.remotes}
        ),
        lambda s: {n["ip"]: n for n in s.kernel.get("neighbours", [])},
        _neighbour,
        _kernel("ip neigh replace {k} lladdr {w[0]} dev {dev} nud permanent"),
    ),
    Compared(
        "FDB entries (other nodes' VTEPs)",
        "overlay",
        lambda s: (
            None
            if s.direct
            else {(r.vtep_mac or "").lower(): (str(r.public_ip), r.node_name) for r in s.remotes}
        ),
        _fdb_by_mac,
        _fdb,
        _kernel("bridge fdb replace {k} dev {dev} dst {w[0]} self permanent"),
    ),
    Compared(
        "stale routes",
        "overlay",
        lambda s: {r.subnet: r for r in s.remotes},
        lambda s: {
            r["dst"]: r
            for r in s.kernel.get("routes", [])
            if r.get("corral") and not _service_route(s.cv, r["dst"])
        },
        _stale(lambda dst, h: f"stale route {dst} via {h.get('gateway')} (no lease in etcd)"),
        _kernel("ip route del {k} proto 77"),
        walk="have",
    ),
    Compared(
        "stale FDB entries",
        "overlay",
        lambda s: None if s.direct else {(r.vtep_mac or "").lower(): r for r in s.remotes},
        lambda s: {(mac, d): d for mac, dsts in _fdb_by_mac(s).items() for d in dsts},
        _stale(lambda k, h: f"stale FDB entry {k[0]} -> {h} (no lease has this VTEP)"),
        _kernel("bridge fdb del {k[0]} dev {dev} dst {h} self"),
        walk="have",
        match=lambda k: k[0],
    ),
    Compared(
        "stale neighbours",
        "overlay",
        _tunnelled,
        lambda s: {
            n["ip"]: n for n in s.kernel.get("neighbours", []) if n.get("state") == "permanent"
        },
        _stale(lambda ip, h: f"stale neighbour {ip} -> {h.get('mac')} (no lease has this subnet)"),
        _kernel("ip neigh del {k} dev {dev}"),
        walk="have",
    ),
)


def _service_route(cv: ClusterView, dst: str) -> bool:
    return dst == str(ipaddress.ip_network(cv.spec.service_cidr))


def _overlay_gate(s: NodeSide) -> tuple[list[Finding], bool]:
    """What stops the comparison before the table: (findings, whether to go on)."""
    if not s.ov:
        return [Finding(s.node, "overlay", "the node agent reports no overlay state")], False
    if "kernelError" in s.ov:
        why = f"the agent could not read the kernel: {s.ov['kernelError']}"
        return [Finding(s.node, "overlay", why)], False
    out = []
    if s.own is None:
        out.append(Finding(s.node, "overlay", "no subnet lease in etcd for this node"))
    if s.kernel.get("device") is None:
        missing = Finding(
            s.node, "overlay", f"VXLAN device {s.dev} is missing", s.dev, "none",
            f"corral net resync {s.node}", "resync-node",
        )  # fmt: skip
        return [*out, missing], False
    return out, True


def check_overlay(cv: ClusterView, node: str, dump: dict[str, Any], dev: str) -> list[Finding]:
    side = NodeSide(cv, node, dump, dev)
    out, go_on = _overlay_gate(side)
    return out + run_table(OVERLAY, side) if go_on else out


# ------------------------------------------------------------ fast path


def _attached(iface: str, w: tuple[str, str], h: dict | None) -> Diff | None:
    prog, note = w
    if h is None or prog in h.get("programs", []):
        return None
    return Diff(
        f"{prog} is not attached to {iface}{note}",
        want=prog,
        have=",".join(h.get("programs", [])) or "none",
    )


def _peer(gw: str, w: SubnetLease, h: dict | None) -> Diff | None:
    mac = (w.vtep_mac or "").lower()
    if h is not None and h["underlayIP"] == str(w.public_ip) and h["vtepMAC"] == mac:
        return None
    now = None if h is None else f"{h['underlayIP']} {h['vtepMAC']}"
    label = f"peers map entry for {w.subnet} ({w.node_name})"
    return _differs(label, f"{gw} -> {w.public_ip} {w.vtep_mac}", now)


def _pod_entry(ip: str, w: dict, h: dict | None) -> Diff | None:
    if h is not None and h["ifindex"] == w["index"]:
        return None
    now = None if h is None else f"ifindex {h['ifindex']}"
    want = f"{ip} -> ifindex {w['index']} ({w['name']})"
    return _differs(f"pods map entry for {ip}", want, now, "points at")


FASTPATH: tuple[Compared[NodeSide], ...] = (
    Compared(
        "fast-path programs on the underlay and the VXLAN device",
        "fastpath",
        lambda s: {
            ((s.ov.get("underlay") or {}).get("iface") or ""): ("from_uplink", ""),
            s.dev: ("from_overlay", ""),
        },
        lambda s: s.links,
        _attached,
        _resync_node,
    ),
    Compared(
        "fast-path program on pod veths",
        "fastpath",
        lambda s: {n: ("from_pod", f" (pod {x['pod']['ip']})") for n, x in s.pod_links.items()},
        lambda s: s.links,
        _attached,
        _resync_node,
    ),
    Compared(
        "peers map",
        "fastpath",
        lambda s: (
            {_gw(r): r for r in s.cv.leases.values() if r.node_name != s.node} if s.maps else None
        ),
        lambda s: {p["gateway"]: p for p in s.maps.get("peers", [])},
        _peer,
        _resync_node,
    ),
    Compared(
        "pods map",
        "fastpath",
        lambda s: {x["pod"]["ip"]: x for x in s.pod_links.values()} if s.maps else None,
        lambda s: {p["ip"]: p for p in s.maps.get("pods", [])},
        _pod_entry,
        _resync_node,
    ),
)


def check_fastpath(cv: ClusterView, node: str, dump: dict[str, Any], dev: str) -> list[Finding]:
    side = NodeSide(cv, node, dump, dev)
    if side.ov.get("datapath") != "bpf":
        return []
    return run_table(FASTPATH, side)


# ------------------------------------------------------------ proxy


def _targets(rules: Iterable[str]) -> list[str]:
    """What a chain's rules do, comparable between what we write and iptables-save prints:
    each rule's jump target (and DNAT destination, affinity set)."""
    out = []
    for ln in rules:
        w = ln.split()
        t = w[w.index("-j") + 1] if "-j" in w else "?"
        if "--to-destination" in w:
            t += " " + w[w.index("--to-destination") + 1]
        if "--match-set" in w:
            t += " set " + w[w.index("--match-set") + 1]
        if "--add-set" in w:
            t += " add " + w[w.index("--add-set") + 1]
        out.append(t)
    return out


def _word_after(flag: str, line: str) -> str | None:
    w = line.split()
    return w[w.index(flag) + 1] if flag in w[:-1] else None


def _jumps(chains: Mapping[str, list[str]]) -> dict[tuple[str, str], str]:
    """(chain, target) for every rule that jumps: the rule."""
    return {
        (c, t): ln for c, rules in chains.items() for ln in rules if (t := _word_after("-j", ln))
    }


def expected_rules(cv: ClusterView) -> dict[str, R.ServiceRules]:
    return {k: R.service_rules(v, str(cv.spec.network)) for k, v in cv.views().items()}


def _chain(chain: str, w: tuple[str, list[str]], h: list[str] | None) -> Diff | None:
    svc, rules = w
    if h is None:
        return Diff(f"{svc}: chain {chain} is missing", want=f"{len(rules)} rule(s)", have="none")
    if _targets(h) == _targets(rules):
        return None
    return Diff(
        f"{svc}: chain {chain} has {len(h)} rule(s), etcd asks {len(rules)}"
        + (" (flushed?)" if not h else ""),
        want="; ".join(_targets(rules)),
        have="; ".join(_targets(h)) or "empty",
    )


def _bucket_chain(sr: R.ServiceRules) -> str:
    return R.bucket_chain(sr.bucket) if sr.bucket is not None else R.SERVICES


def _wanted_chains(s: NodeSide) -> dict[str, str]:
    out = {}
    for svc, sr in s.service_rules.items():
        out |= dict.fromkeys(sr.chains, svc)
        if sr.bucket is not None and sr.portals:
            out[R.bucket_chain(sr.bucket)] = svc
    return out


PROXY: tuple[Compared[NodeSide], ...] = (
    Compared(
        "nat hooks into the services chain",
        "proxy",
        lambda s: dict.fromkeys(("PREROUTING", "OUTPUT"), R.SERVICES),
        lambda s: s.nat("hooks"),
        lambda hook, w, h: (
            None
            if any(f"-j {w}" in ln for ln in h or [])
            else Diff(f"nat {hook} does not jump to {w}")
        ),
        _resync_proxy,
    ),
    Compared(
        "service chains (their rules' targets, DNAT destinations, affinity)",
        "proxy",
        lambda s: {
            c: (svc, r) for svc, sr in s.service_rules.items() for c, r in sr.chains.items()
        },
        lambda s: s.nat(),
        _chain,
        _resync_proxy,
        pending=True,
    ),
    Compared(
        "jumps to services' buckets",
        "proxy",
        lambda s: {
            (svc, R.bucket_chain(sr.bucket)): svc
            for svc, sr in s.service_rules.items()
            if sr.bucket is not None and sr.portals
        },
        lambda s: _jumps(s.nat()),
        lambda k, w, h: (
            None
            if h is not None
            else Diff(f"{k[0]}: no {R.SERVICES} rule jumps to its bucket {k[1]}")
        ),
        _resync_proxy,
        match=lambda k: (R.SERVICES, k[1]),
        pending=True,
    ),
    Compared(
        "cluster-IP portals (a bucket's jump to a service chain)",
        "proxy",
        lambda s: {
            (svc, _bucket_chain(sr), line.split("-j ")[-1].strip()): line
            for svc, sr in s.service_rules.items()
            for line in sr.portals
        },
        lambda s: _jumps(s.nat()),
        lambda k, w, h: (
            None if h is not None else Diff(f"{k[0]}: no {k[1]} rule jumps to {k[2]}", want=w)
        ),
        _resync_proxy,
        match=lambda k: k[1:],
        pending=True,
    ),
    Compared(
        "REJECT rules of services without endpoints",
        "proxy",
        lambda s: {
            (svc, vip): line
            for svc, sr in s.service_rules.items()
            for line in sr.rejects
            if (vip := _word_after("-d", line))  # a node port's REJECT has no VIP
        },
        lambda s: {
            vip: ln for ln in s.filter_chains.get(R.SERVICES, []) if (vip := _word_after("-d", ln))
        },
        lambda k, w, h: (
            None
            if h is not None
            else Diff(f"{k[0]}: no REJECT for {k[1]} (a service without endpoints)", want=w)
        ),
        _resync_proxy,
        match=lambda k: k[1],
        pending=True,
    ),
    Compared(
        "affinity sets",
        "proxy",
        lambda s: {(svc, name): svc for svc, sr in s.service_rules.items() for name in sr.sets},
        lambda s: (s.px.get("kernel") or {}).get("ipsets") or {},
        lambda k, w, h: None if h is not None else Diff(f"{k[0]}: affinity set {k[1]} is missing"),
        _resync_proxy,
        match=lambda k: k[1],
    ),
    Compared(
        "stale chains",
        "proxy",
        _wanted_chains,
        lambda s: {c: r for c, r in sorted(s.nat().items()) if R.owned_chain(c)},
        _stale(lambda chain, h: f"stale chain {chain} (no service in etcd needs it)"),
        _resync_proxy,
        walk="have",
        pending=True,
    ),
)


# the nftables mode: its table as the dump's `kernel.nftables` (proxy/nftables.py describe)


def _nft(s: NodeSide) -> dict[str, Any]:
    return (s.px.get("kernel") or {}).get("nftables") or {}


def _nft_expected(s: NodeSide) -> dict[str, Any]:
    from corral.proxy import nftrules as NR

    cidr = str(s.cv.spec.network)
    return {k: NR.service_rules(v, cidr) for k, v in sorted(s.cv.views().items())}


def _nft_element(k: Any, w: Any, h: Any) -> Diff | None:
    svc, m, key = k
    if h == w:
        return None
    if h is None:
        return Diff(f"{svc}: {m} has no element {key}", want=w, have="none")
    return Diff(f"{svc}: {m} element {key} dispatches elsewhere", want=w, have=h)


def _nft_chain(k: Any, w: Any, h: Any) -> Diff | None:
    svc, chain = k
    if h is None:
        return Diff(f"{svc}: chain {chain} is missing", want=f"{w} rule(s)", have="none")
    if len(h) != w:
        return Diff(f"{svc}: chain {chain} has {len(h)} rule(s), etcd asks {w}"
                    + (" (flushed?)" if not h else ""), want=str(w), have=str(len(h)))  # fmt: skip
    return None


PROXY_NFT: tuple[Compared[NodeSide], ...] = (
    Compared(
        "nftables map elements",
        "proxy",
        lambda s: {
            (svc, m, key): v
            for svc, r in _nft_expected(s).items()
            for m, els in r.elements.items()
            for key, v in els.items()
        },
        lambda s: {
            (m, key): v for m, els in _nft(s).get("maps", {}).items() for key, v in els.items()
        },
        _nft_element,
        _resync_proxy,
        match=lambda k: (k[1], k[2]),
        pending=True,
    ),
    Compared(
        "nftables service chains",
        "proxy",
        lambda s: {
            (svc, chain): len(rules)
            for svc, r in _nft_expected(s).items()
            for chain, rules in r.chains.items()
        },
        lambda s: _nft(s).get("chains", {}),
        _nft_chain,
        _resync_proxy,
        match=lambda k: k[1],
        pending=True,
    ),
    Compared(
        "nftables stale chains",
        "proxy",
        lambda s: {c: svc for svc, r in _nft_expected(s).items() for c in r.chains},
        lambda s: {
            c: r for c, r in _nft(s).get("chains", {}).items() if c.startswith(("svc-", "ep-"))
        },
        _stale(lambda chain, h: f"stale chain {chain} (no service in etcd needs it)"),
        _resync_proxy,
        walk="have",
        pending=True,
    ),
)


def check_proxy(cv: ClusterView, node: str, dump: dict[str, Any]) -> list[Finding]:
    side = NodeSide(cv, node, dump)
    if not side.px:
        return [Finding(node, "proxy", "the proxy reports no state")]
    if side.px.get("mode") == "nftables":
        return run_table(PROXY_NFT, side)
    if side.px.get("mode") not in (None, "iptables"):
        return []  # another mode's state is its own to compare (docs/net.md, Explainers)
    return run_table(PROXY, side)


# ------------------------------------------------------------ IPAM and sandboxes


def _age(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return time.time() - t.timestamp()


@dataclass
class ClusterSide:
    """etcd's allocations and pods next to every answering node's veths and sandboxes.
    Its keys start with the node they concern (None: cluster-wide)."""

    cv: ClusterView
    dumps: dict[str, NodeDumps]
    pending = ""

    def node_of(self, key: tuple) -> str | None:
        return key[0]

    @cached_property
    def live_pods(self) -> dict[str, list[str]]:
        """pod IP -> the pods (ns/name) etcd gives it, finished pods left out."""
        out: dict[str, list[str]] = {}
        for p in self.cv.pods:
            if p.status.pod_ip and p.status.phase not in ("Succeeded", "Failed"):
                out.setdefault(p.status.pod_ip, []).append(f"{p.namespace}/{p.name}")
        return dict(sorted(out.items()))

    @cached_property
    def allocated(self) -> set[str]:
        return {a.ip for a in self.cv.allocations}

    @cached_property
    def veths(self) -> dict[str, dict[str, dict[str, Any]]]:
        """node -> pod IP -> host veth, for the nodes that answered."""
        return {n: pod_veths(d.node) for n, d in self.dumps.items() if d.node is not None}

    def veth_keys(self, own_subnet_only: bool = False) -> dict[tuple[str, str], dict[str, Any]]:
        out = {}
        for node, by_ip in sorted(self.veths.items()):
            own = self.cv.lease_of(node)
            for ip, link in sorted(by_ip.items()):
                if (
                    own_subnet_only
                    and own is not None
                    and (ipaddress.ip_address(ip) not in ipaddress.ip_network(own.subnet))
                ):
                    continue  # an explicit range outside the node subnet: another pool's
                out[(node, ip)] = link
        return out


def _leaked(k: tuple, a: Allocation, h: dict | None) -> Diff | None:
    if h is not None:
        return None
    age = _age(a.alloc.created_at)
    if age is not None and age < LEAK_GRACE:
        return None
    al = a.alloc
    owner = f"{al.pod_namespace}/{al.pod_name}" if al.pod_name else al.container_id[:12]
    return Diff(
        f"leaked IP {a.ip} (pool {al.pool}, owner {owner}): no pod has it and no sandbox on "
        f"{k[0]} uses it",
        want="free",
        have=f"allocated to container {al.container_id[:12]}",
    )


def _release(s: ClusterSide, k: tuple, a: Allocation, h: Any) -> Repair:
    return Repair("release", fix=f"corral net ipam --release {a.ip}", key=a.key)


def _unaccounted(k: tuple[str, str], w: list[str] | Literal[True] | None, h: dict) -> Diff | None:
    """A pod veth whose IP etcd did not allocate: in use by a pod etcd knows, or an orphan."""
    ip = k[1]
    if w is True:
        return None
    if w:
        return Diff(
            f"IP {ip} is in use by {', '.join(w)} (veth {h['name']}) but not allocated in etcd: "
            "another pod may be given it too"
        )
    return Diff(f"orphan veth {h['name']} (pod IP {ip}): no allocation in etcd")


def _unaccounted_fix(s: ClusterSide, k: tuple, w: list[str] | None, h: dict) -> Repair:
    if w:
        return Repair(fix=f"{_delete_pod(w[0])} (its replacement gets a fresh allocation)")
    return Repair(fix=f"ip link del {h['name']}")


def _delete_pod(key: str) -> str:
    ns, _, name = key.partition("/")
    return f"corral delete pod {name} -n {ns}"


def _sandboxes(s: ClusterSide) -> dict[tuple[str, str, str], str]:
    """(node, pod, IP) of each live sandbox the node agents report."""
    out = {}
    for node, d in sorted(s.dumps.items()):
        for key, p in sorted(_component(d.node, "pods").get("pods", {}).items()):
            down = p.get("gone") or p.get("terminating") or p.get("networkDown")
            if p.get("ip") and not down:
                out[(node, key, p["ip"])] = key
    return out


def _allocations_by_ip(s: ClusterSide) -> dict[tuple[None, str], list[str]]:
    out: dict[tuple[None, str], list[str]] = {}
    for a in s.cv.allocations:
        out.setdefault((None, a.ip), []).append(a.key)
    return dict(sorted(out.items()))


def _nothing(s: Any) -> dict:
    return {}


def _left_alone(*_: Any) -> Repair:
    return Repair()


IPAM: tuple[Compared[ClusterSide], ...] = (
    Compared(
        "one pod per IP (etcd)",
        "ipam",
        lambda s: {(None, ip): names for ip, names in s.live_pods.items()},
        _nothing,
        lambda k, w, h: Diff(f"duplicate pod IP {k[1]}: {', '.join(w)}") if len(w) > 1 else None,
        _left_alone,
    ),
    Compared(
        "one pool per allocated IP (etcd)",
        "ipam",
        _allocations_by_ip,
        _nothing,
        lambda k, w, h: (
            Diff(f"IP {k[1]} allocated in {len(w)} pools: " + ", ".join(w)) if len(w) > 1 else None
        ),
        _left_alone,
    ),
    Compared(
        "allocation owner keys (etcd)",
        "ipam",
        lambda s: {(a.alloc.node_name, a.key, a.owner_key): a for a in s.cv.allocations},
        lambda s: s.cv.owners,
        lambda k, a, h: (
            None if h is not None else Diff(f"allocation {a.ip} has no owner key ({a.owner_key})")
        ),
        _release,
        match=lambda k: k[2],
    ),
    Compared(
        "leaked allocations (allocated, no pod, no sandbox)",
        "ipam",
        lambda s: {
            (a.alloc.node_name, a.key, a.ip): a
            for a in s.cv.allocations
            if a.owner_key in s.cv.owners  # else reported above
            and a.alloc.node_name in s.veths  # else the node did not answer
            and a.ip not in s.live_pods
        },
        lambda s: s.veth_keys(),
        _leaked,
        _release,
        match=lambda k: (k[0], k[2]),
    ),
    Compared(
        "sandboxes' veths",
        "ipam",
        _sandboxes,
        lambda s: s.veth_keys(),
        lambda k, w, h: (
            None
            if h is not None
            else Diff(
                f"pod {w}'s sandbox has IP {k[2]} but no veth on {k[0]} carries it: "
                "the pod has lost its network"
            )
        ),
        lambda s, k, w, h: Repair(fix=f"{_delete_pod(w)} (its replacement is wired afresh)"),
        match=lambda k: (k[0], k[2]),
    ),
    Compared(
        "pod veths etcd did not allocate",
        "ipam",
        lambda s: (
            {a.ip: True for a in s.cv.allocations}
            | {ip: users for ip, users in s.live_pods.items() if ip not in s.allocated}
        ),
        lambda s: s.veth_keys(own_subnet_only=True),
        _unaccounted,
        _unaccounted_fix,
        walk="have",
        match=lambda k: k[1],
    ),
)


def check_ipam(cv: ClusterView, dumps: dict[str, NodeDumps]) -> list[Finding]:
    return run_table(IPAM, ClusterSide(cv, dumps))


# ------------------------------------------------------------ everything


def check(cv: ClusterView, dumps: dict[str, NodeDumps]) -> list[Finding]:
    out: list[Finding] = []
    dev = cv.device
    for node, d in sorted(dumps.items()):
        if d.node is None:
            out.append(Finding(node, "node", f"node agent unreachable: {d.node_error}"))
        else:
            out += check_overlay(cv, node, d.node, dev)
            out += check_fastpath(cv, node, d.node, dev)
        if d.proxy is None:
            if d.proxy_error:
                out.append(Finding(node, "proxy", f"proxy unreachable: {d.proxy_error}"))
        else:
            out += check_proxy(cv, node, d.proxy)
    out += check_ipam(cv, dumps)
    return out
