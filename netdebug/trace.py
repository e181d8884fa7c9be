"""`corral net trace FROM TO[:PORT][/PROTO]`: the planned path, then a real probe.

The plan is a list of hops, each a decision with the state behind it, read from
etcd and the nodes' debug dumps: the DNS answer (TO a name), the source node's
service decision (its proxy mode's explainer), the source node's routing (eBPF
fast path or the kernel's, and why), the VXLAN encapsulation (VTEP MAC,
FDB entry, remote underlay IP), the destination node's decapsulation and the
destination pod's veth.

The probe then sends one real connection from the source pod (a TCP connect from
a chosen source port, a UDP datagram, or an ICMP echo with a chosen id) while
scapy sniffers on the hops' interfaces watch for exactly that packet: the source
pod's veth, the source node's underlay (VXLAN, inner addresses decoded), the
destination node's underlay and the destination pod's own interface (the fast
path hands packets to the pod's side of the veth, past the host side). Each hop
is confirmed or refuted, and the first hop where reality departs from the plan
is marked. For a service, the backend the node really chose is read from the
source node's conntrack entry of the probe's own flow.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.api.objects import SubnetLease
from corral.netdebug import check, decode, explain, policy
from corral.netdebug.access import NodeAccess, NodeUnreachable
from corral.netdebug.model import ClusterView
from corral.netdebug.render import Out, Progress


class TraceError(RuntimeError):
    pass


@dataclass
class Hop:
    step: str
    node: str | None
    decision: str
    state: dict[str, Any] = field(default_factory=dict)
    probe: str | None = None  # the sniffer (or check) that confirms it
    status: str = "planned"  # planned, confirmed, refuted, broken (the plan itself fails)
    seen: str = ""

    def __post_init__(self) -> None:
        self.plan_ok = self.status != "broken"


@dataclass
class Result:
    source: str
    target: str
    hops: list[Hop]
    probe: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None  # the service backend the probe's connection used
    planned_backend: str | None = None
    departure: int | None = None  # index of the first hop where reality departs

    @property
    def ok(self) -> bool:
        return self.departure is None and all(h.status != "broken" for h in self.hops)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["departure"] = None if self.departure is None else self.hops[self.departure].step
        return d


_TARGET = re.compile(r"^(?P<host>[^:]+?)(:(?P<port>\d+))?(/(?P<proto>tcp|udp|icmp))?$", re.I)


def _ov(dumps: dict[str, check.NodeDumps], node: str) -> dict[str, Any]:
    d = dumps.get(node)
    return check._component(d.node if d else None, "overlay")


def _veth_of(dumps: dict[str, check.NodeDumps], node: str, ip: str) -> dict[str, Any] | None:
    d = dumps.get(node)
    return check.pod_veths(d.node if d else None).get(ip)


def _pod_netns(dumps: dict[str, check.NodeDumps], node: str, ns: str, name: str) -> str | None:
    d = dumps.get(node)
    pods = check._component(d.node if d else None, "pods").get("pods", {})
    return (pods.get(f"{ns}/{name}") or {}).get("netns") or None


def agent_argv(acc: NodeAccess, verb: str, **flags: Any) -> list[str]:
    """The node-side agent's command line on `acc`'s node: `--flag value` per keyword
    (None and False left out, True given bare, a list repeated)."""
    argv = [acc.python, "-m", "corral.netdebug.agent", verb]
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if v is None or v is False:
            continue
        if v is True:
            argv.append(flag)
        elif isinstance(v, list | tuple):
            for x in v:
                argv += [flag, str(x)]
        else:
            argv += [flag, str(v)]
    return argv


@dataclass
class Source:
    """The traced pod, as etcd and its node agent know it."""

    ns: str
    name: str
    node: str
    ip: str
    dumps: check.NodeDumps
    veth: dict[str, Any] | None
    netns: str | None

    @property
    def key(self) -> str:
        return f"{self.ns}/{self.name}"


@dataclass
class Target:
    ip: str
    port: int | None
    proto: str
    label: str  # TO as the result shows it: host:port/proto
    vip: str | None = None  # the IP, when it is a service VIP


@dataclass
class Tracer:
    """One trace's facts: etcd, the nodes' dumps, the source pod."""

    cv: ClusterView
    nodes: dict[str, NodeAccess]
    dumps: dict[str, check.NodeDumps]
    src: Source
    timeout: float

    @property
    def src_ov(self) -> dict[str, Any]:
        return _ov(self.dumps, self.src.node)

    @property
    def maps(self) -> dict[str, Any]:
        return self.src_ov.get("fastpathMaps") or {}

    @property
    def bpf(self) -> bool:
        return self.src_ov.get("datapath") == "bpf"

    @property
    def on_veth(self) -> bool:
        """from_pod is on the source pod's veth: its packets take the fast path."""
        v = self.src.veth
        return v is not None and "from_pod" in (v.get("programs") or [])


def trace(
    cv: ClusterView,
    nodes: dict[str, NodeAccess],
    source: str,
    target: str,
    probe: bool = True,
    timeout: float = 3.0,
    collect: Callable[..., dict[str, check.NodeDumps]] | None = None,
) -> Result:
    """The hops in order: source pod, [dns], [service], routing, [vxlan encap,
    destination node], destination pod; each confirmed or refuted by the probe."""
    ns, name = _source_pod(cv, source)
    host, port, proto = _parse_target(target)
    assert collect is not None
    dumps = collect(nodes)
    t = Tracer(cv, nodes, dumps, _source(cv, dumps, ns, name), timeout)
    hops = [_source_hop(t.src)]
    tgt = _target(t, host, port, proto, target, hops)
    if tgt is None:
        return Result(t.src.key, target, hops)
    result = Result(t.src.key, tgt.label, hops)
    candidates = [tgt.ip]
    if tgt.vip:
        found = _service(t, tgt, result, probe)
        if found is None:
            return result
        candidates = found
    # probe first when the backend is random, then plan the path it took
    probed = Probe(t, tgt, candidates).run() if probe else {}
    if probe:
        result.probe = {k: v for k, v in probed.items() if k != "sniffed"}
    dest = _destination(t, tgt, result, probed, candidates, probe)
    hops.append(_policy_hop(t, tgt, result, dest))
    hops += _path(t, dest, via_vip=tgt.vip is not None)
    if probe:
        _confirm(hops, probed.get("sniffed", {}), dest)
        _confirm_policy(hops)
        result.departure = _first(hops, ("refuted", "broken"))
    else:
        result.departure = _first(hops, ("broken",))
    return result


def _policy_hop(t: Tracer, tgt: Target, result: Result, dest: str) -> Hop:
    """NetworkPolicy's verdict on the flow as it reaches FORWARD (after any DNAT): the
    source's egress on its node, the destination's ingress on its node."""
    port = tgt.port
    if tgt.vip and result.backend:
        port = int(result.backend.rsplit(":", 1)[1])
    proto = tgt.proto or ("tcp" if port else "icmp")
    v = policy.verdict(t.cv, t.src.ip, dest, proto, port)
    d = v.deciding
    lease = t.cv.lease_for_ip(dest)
    where = t.src.node if d.direction == "Egress" or lease is None else lease.node_name
    state = {"egress": str(v.egress), "ingress": str(v.ingress), "allowed": v.allowed}
    if v.allowed:
        return Hop("network policy", where, f"allowed: {v.egress}; {v.ingress}", state)
    whose = dest if d.direction == "Ingress" else t.src.key
    text = f"DROPPED by the {d.direction.lower()} of {whose}: {d.reason}"
    return Hop("network policy", where, text, state, status="broken")


def _confirm_policy(hops: list[Hop]) -> None:
    """The probe confirms the policy hop: an allowed flow reached the pod, a dropped one
    did not."""
    pol = next((h for h in hops if h.step == "network policy"), None)
    pod = next((h for h in hops if h.step == "destination pod"), None)
    if pol is None or pod is None or pod.status not in ("confirmed", "refuted"):
        return
    reached = pod.status == "confirmed"
    if pol.status == "broken":
        if reached:
            pol.status, pol.seen = "refuted", "the probe reached the pod although policy drops it"
        else:
            pol.seen = "the probe did not reach the pod, as the policy says"
    elif reached:
        pol.status, pol.seen = "confirmed", "the probe reached the pod"


def _first(hops: list[Hop], statuses: tuple[str, ...]) -> int | None:
    return next((i for i, h in enumerate(hops) if h.status in statuses), None)


# ------------------------------------------------------------ FROM and TO


def _source_pod(cv: ClusterView, source: str) -> tuple[str, str]:
    ns, _, name = source.rpartition("/")
    ns = ns or "default"
    src = cv.pod(name, ns)
    if src is None:
        raise TraceError(f"pod {ns}/{name} not found (corral get pods -n {ns})")
    if not src.spec.node_name or not src.status.pod_ip:
        raise TraceError(f"pod {ns}/{name} has no node or IP yet ({src.status.phase})")
    return ns, name


def _parse_target(target: str) -> tuple[str, int | None, str]:
    m = _TARGET.match(target)
    if not m:
        raise TraceError(
            f"TO {target!r}: give a pod, service, DNS name, VIP or IP, optionally :PORT and "
            "/tcp, /udp or /icmp (e.g. web:80/tcp)"
        )
    return m["host"], int(m["port"]) if m["port"] else None, (m["proto"] or "").lower()


def _source(cv: ClusterView, dumps: dict[str, check.NodeDumps], ns: str, name: str) -> Source:
    pod = cv.pod(name, ns)
    assert pod is not None and pod.spec.node_name
    node, ip = pod.spec.node_name, str(pod.status.pod_ip)
    d = dumps.get(node)
    if d is None or d.node is None:
        raise TraceError(
            f"source node {node} unreachable: {d.node_error if d else 'not in the cluster'}"
        )
    return Source(
        ns, name, node, ip, d, _veth_of(dumps, node, ip), _pod_netns(dumps, node, ns, name)
    )


def _source_hop(src: Source) -> Hop:
    return Hop(
        "source pod",
        src.node,
        f"{src.key} {src.ip}, host veth {src.veth['name'] if src.veth else '?'}",
        {"veth": src.veth, "netns": src.netns},
        probe="src" if src.veth else None,
        status="planned" if src.veth else "broken",
    )


def _target(
    t: Tracer, host: str, port: int | None, proto: str, target: str, hops: list[Hop]
) -> Target | None:
    """What TO is: an IP, a service (its VIP, and its first port unless given), a pod or
    a DNS name the cluster DNS answers (a `dns` hop). None: the name did not resolve."""
    try:
        ip = str(ipaddress.IPv4Address(host))
    except ValueError:
        svc = t.cv.service(host, t.src.ns)
        pod = t.cv.pod(host, t.src.ns)
        if svc is not None and svc.spec.cluster_ip:
            ip = svc.spec.cluster_ip
            if port is None and svc.spec.ports:
                port = svc.spec.ports[0].port
                proto = proto or svc.spec.ports[0].protocol.lower()
        elif pod is not None and pod.status.pod_ip:
            ip = str(pod.status.pod_ip)
        elif "." in host:
            found = _resolve(t.cv, t.nodes[t.src.node], t.src.netns, host, hops)
            if found is None:
                return None
            ip = found
        else:
            raise TraceError(
                f"TO {host!r}: no pod or service of that name in namespace {t.src.ns}"
            ) from None
    proto = proto or ("tcp" if port else "icmp")
    if proto != "icmp" and port is None:
        raise TraceError(f"TO {target!r}: give a port for {proto} (e.g. {host}:80/{proto})")
    label = f"{host}:{port}/{proto}" if port else f"{host}/{proto}"
    in_services = ipaddress.ip_address(ip) in ipaddress.ip_network(t.cv.spec.service_cidr)
    return Target(ip, port, proto, label, ip if in_services else None)


def _resolve(
    cv: ClusterView, acc: NodeAccess, netns: str | None, name: str, hops: list[Hop]
) -> str | None:
    server = str(cv.spec.cluster_dns)
    argv = agent_argv(acc, "resolve", name=name, server=server, netns=netns)
    err = "no answer"
    try:
        p = acc.run(argv, timeout=20)
        doc = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
        err = p.stderr.strip()
    except (NodeUnreachable, ValueError) as e:
        doc = {"error": str(e)}
    if doc.get("answers"):
        ip = doc["answers"][0]
        how = f"{name} -> {ip} (cluster DNS {server}, TTL {doc.get('ttl')})"
        hops.append(Hop("dns", acc.name, how, doc, status="confirmed"))
        return ip
    err = doc.get("error") or err
    why = "no cluster DNS answered" if "no cluster DNS" in str(err) else str(err)
    hops.append(
        Hop(
            "dns",
            acc.name,
            f"{name}: {why} (asked {server} from the pod's network; is `corral dns` deployed "
            "behind that VIP?)",
            doc,
            status="broken",
        )
    )
    return None


# ------------------------------------------------------------ the service decision


def _service(t: Tracer, tgt: Target, result: Result, probe: bool) -> list[str] | None:
    """The source node's proxy decision for a VIP (a `service` hop): the backends the
    probe may reach, or None when the trace ends here."""
    d, hops = t.src.dumps, result.hops
    if d.proxy is None:
        hops.append(
            Hop("service", t.src.node, f"proxy unreachable: {d.proxy_error}", status="broken")
        )
        return None
    svc = t.cv.service_by_ip(tgt.ip)
    ex = explain.explainer(d.proxy)
    dec = ex.decide(explain.proxy_state(d.proxy), tgt.ip, tgt.port or 0, tgt.proto, t.src.ip)
    what = f"{svc.namespace}/{svc.name}" if svc else "no Service in etcd has this VIP"
    hops.append(
        Hop(
            "service",
            t.src.node,
            f"{what} {tgt.ip}:{tgt.port}/{tgt.proto}: {dec.why}",
            {"mode": ex.mode, "rule": dec.rule, "candidates": dec.candidates, **dec.state},
            probe="conntrack" if dec.candidates else "refused",
            status="planned" if dec.found else "broken",
        )
    )
    result.planned_backend = dec.backend
    if not dec.found:
        return None
    if not dec.candidates:
        if probe:
            _expect_refusal(t, tgt, result)
        return None
    return [b.rsplit(":", 1)[0] for b in ([dec.backend] if dec.backend else dec.candidates)]


def _expect_refusal(t: Tracer, tgt: Target, result: Result) -> None:
    """A service without endpoints: the probe is refused (TCP reset) or unanswered."""
    result.probe = Probe(t, tgt, []).run()
    refused = result.probe.get("result") in ("refused", "no reply")
    h = result.hops[-1]
    h.status = "confirmed" if refused else "refuted"
    h.seen = f"the probe was {result.probe.get('result')}"
    result.departure = None if refused else len(result.hops) - 1


def _destination(
    t: Tracer, tgt: Target, result: Result, probed: dict, candidates: list[str], probe: bool
) -> str:
    """The IP the path is planned to: for a service, the backend the node's conntrack
    says the probe went to (which confirms or refutes the `service` hop), else the
    planned one."""
    dest = candidates[0]
    if tgt.vip and probe:
        h = result.hops[-1]
        flows = probed.get("conntrack") or []
        if not flows:
            h.status, h.seen = "refuted", "no conntrack entry for the probe's flow on " + t.src.node
            return dest
        result.backend = f"{flows[0]['backend']}:{flows[0]['backendPort']}"
        agrees = not result.planned_backend or result.planned_backend == result.backend
        h.status = "confirmed" if agrees else "refuted"
        h.seen = f"conntrack: the node chose {result.backend}"
        return flows[0]["backend"]
    if tgt.vip and result.planned_backend:
        return result.planned_backend.rsplit(":", 1)[0]
    return dest


def _confirm(hops: list[Hop], sniffed: dict[str, dict[str, str]], dest: str) -> None:
    """Each hop with a sniffer: confirmed if it saw the probe's packet, else refuted (or
    unchecked, when the sniffer itself failed)."""
    for h in hops:
        if h.probe not in sniffed:
            continue
        seen = sniffed[h.probe]
        got = seen.get(dest) or seen.get("*")
        if got:
            h.status, h.seen = "confirmed", got
        elif seen.get("_error"):
            h.status, h.seen = "unchecked", seen["_error"]
        else:
            h.status, h.seen = "refuted", "the probe's packet was not seen here"


# ------------------------------------------------------------ the path


def _path(t: Tracer, dest: str, via_vip: bool) -> list[Hop]:
    lease = t.cv.lease_for_ip(dest)
    if lease is None:
        text = (
            f"{dest} is in no node's subnet: the node's own routes "
            "(masqueraded if it leaves the cluster network)"
        )
        return [Hop("routing", t.src.node, text, status="planned")]
    if lease.node_name == t.src.node:
        hops = [_local_routing(t, dest, lease, via_vip)]
    else:
        r = _remote(t, lease, via_vip)
        hops = [_remote_routing(t, r, via_vip), _encap(t, r, dest), _decap(t, r, dest)]
    return [*hops, _destination_pod(t, dest, lease.node_name)]


def _local_routing(t: Tracer, dest: str, lease: SubnetLease, via_vip: bool) -> Hop:
    local = next((p for p in t.maps.get("pods", []) if p["ip"] == dest), None)
    if t.bpf and t.on_veth and local and not via_vip:
        why = (
            f"fast path: from_pod finds {dest} in the pods map "
            f"(ifindex {local['ifindex']}) and redirects to it"
        )
    else:
        why = "kernel: the cni0 bridge delivers it to the pod's veth" + (
            " (DNATed by netfilter, so not on the fast path)" if via_vip else ""
        )
    return Hop(
        "routing", t.src.node, f"{dest} is on this node ({lease.subnet}); {why}", probe="src"
    )


@dataclass
class Remote:
    """The source node's state for reaching another node's subnet."""

    lease: SubnetLease
    gw: str
    peer: dict[str, Any] | None  # its fast-path peers map entry
    route: dict[str, Any] | None
    neigh: dict[str, Any] | None
    mac: str | None  # the remote VTEP's MAC
    fdb: list[str]  # the FDB's underlay IPs for that MAC
    fast: bool  # the fast path encapsulates (else the kernel's VXLAN device)

    @property
    def node(self) -> str:
        return self.lease.node_name

    @property
    def underlay_ip(self) -> str:
        return str(self.lease.public_ip)


def _remote(t: Tracer, lease: SubnetLease, via_vip: bool) -> Remote:
    kern = t.src_ov.get("kernel") or {}
    gw = str(ipaddress.ip_network(lease.subnet).network_address)
    peer = next((p for p in t.maps.get("peers", []) if p["gateway"] == gw), None)
    route = next((r for r in kern.get("routes", []) if r["dst"] == lease.subnet), None)
    neigh = next((n for n in kern.get("neighbours", []) if n["ip"] == gw), None)
    mac = (neigh or {}).get("mac") or (peer or {}).get("vtepMAC")
    fdb = [f["dst"] for f in kern.get("fdb", []) if mac and f["mac"] == mac]
    fast = bool(t.bpf and t.on_veth and peer and not via_vip)
    return Remote(lease, gw, peer, route, neigh, mac, fdb, fast)


def _remote_routing(t: Tracer, r: Remote, via_vip: bool) -> Hop:
    if r.fast:
        assert t.src.veth is not None and r.peer is not None
        why = (
            f"fast path: from_pod on {t.src.veth['name']} encapsulates itself: peers map "
            f"{r.gw} -> {r.peer['underlayIP']} VTEP {r.peer['vtepMAC']}, out of the underlay"
        )
    else:
        route = r.route
        why = f"kernel: {_why_not_fast(t, r, via_vip)}: route " + (
            f"{route['dst']} via {route['gateway']} dev {route['dev']}"
            f"{' onlink' if route['onlink'] else ''}"
            if route
            else f"to {r.lease.subnet} MISSING"
        )
    return Hop(
        "routing",
        t.src.node,
        why,
        {"route": r.route, "peer": r.peer},
        probe="src",
        status="broken" if not r.fast and r.route is None else "planned",
    )


def _why_not_fast(t: Tracer, r: Remote, via_vip: bool) -> str:
    if not t.bpf:
        return f"datapath kernel ({t.src_ov.get('datapathWhy') or 'fast path off'})"
    if via_vip:
        return "the packet was DNATed by netfilter (iptables proxy), after the veth's program"
    if not t.on_veth:
        return f"from_pod is not attached to {t.src.veth['name'] if t.src.veth else 'the veth'}"
    if not r.peer:
        return f"no peers map entry for {r.gw}"
    return ""


def _encap(t: Tracer, r: Remote, dest: str) -> Hop:
    vtep_ok = r.fast or (r.neigh is not None and r.fdb == [r.underlay_ip])
    return Hop(
        "vxlan encap",
        t.src.node,
        f"VNI {t.cv.spec.backend.vni}: inner {t.src.ip} > {dest}, VTEP MAC {r.mac or 'MISSING'}"
        + (f" (neighbour {r.gw} {r.neigh['state']})" if r.neigh else "")
        + f", FDB {r.mac} -> {', '.join(r.fdb) or 'MISSING'}; "
        + f"outer {t.cv.node_ip(t.src.node)} > {r.underlay_ip}"
        + (" (the fast path's own copy of these, from the peers map)" if r.fast else ""),
        {
            "neighbour": r.neigh,
            "fdb": r.fdb,
            "lease": {"node": r.node, "publicIP": r.underlay_ip, "vtepMAC": r.lease.vtep_mac},
        },
        probe="out",
        status="planned" if vtep_ok else "broken",
    )


def _decap(t: Tracer, r: Remote, dest: str) -> Hop:
    dov = _ov(t.dumps, r.node)
    links = {link["name"]: link for link in dov.get("links", [])}
    ul = (dov.get("underlay") or {}).get("iface")
    dpod = next(
        (p for p in (dov.get("fastpathMaps") or {}).get("pods", []) if p["ip"] == dest), None
    )
    at = f"{r.node} ({r.underlay_ip})"
    if not dov:
        text = f"{at}: its node agent is unreachable, decapsulation unknown"
    elif (
        dov.get("datapath") == "bpf"
        and "from_uplink" in (links.get(ul or "", {}).get("programs") or [])
        and dpod
    ):
        text = (
            f"{at} on {ul}: from_uplink decapsulates and redirects into "
            f"the pod (pods map ifindex {dpod['ifindex']})"
        )
    else:
        text = (
            f"{at} on {ul}: {t.cv.device} decapsulates, the kernel routes to "
            "cni0 and the pod's veth"
        )
    return Hop("destination node", r.node, text, probe="in")


def _destination_pod(t: Tracer, dest: str, dnode: str) -> Hop:
    pod = t.cv.pod_by_ip(dest)
    pod_name = f"{pod.namespace}/{pod.name}" if pod else "no pod in etcd"
    veth = _veth_of(t.dumps, dnode, dest)
    hairpin = " (hairpin: the pod is its own backend; the node masquerades the source)"
    return Hop(
        "destination pod",
        dnode,
        f"{pod_name} {dest} behind veth {veth['name'] if veth else 'MISSING'}"
        + (hairpin if dest == t.src.ip else ""),
        {"veth": veth},
        probe="pod",
        status="planned" if veth else "broken",
    )


# ------------------------------------------------------------ the probe


@dataclass
class Sniffer:
    probe: str  # the hop's probe id: src, out, in, pod
    key: str  # the candidate backend it watches for, or * (any)
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    ready: bool = False


class Probe:
    """One real packet from the source pod, with a sniffer on each hop that should see
    it; `run()` says what the connection did and what each sniffer saw."""

    def __init__(self, t: Tracer, tgt: Target, candidates: list[str]) -> None:
        self.t, self.tgt, self.candidates = t, tgt, candidates
        self.sport = random.randint(40000, 59999)
        self.wait = t.timeout + 2
        self.sniffers: list[Sniffer] = []

    def run(self) -> dict[str, Any]:
        self._start_sniffers()
        out: dict[str, Any] = {"sport": self.sport, "sniffed": {}}
        with Progress("probing: starting sniffers") as prog:
            self._await_ready(prog)
            prog.step("sending the probe")
            out.update(self._send())
            if self.tgt.vip and self.tgt.proto != "icmp":
                out["conntrack"] = self._conntrack()
            prog.step("reading the sniffers")
            out["sniffed"] = self._read()
        return out

    def _start(
        self,
        probe: str,
        key: str,
        node: str,
        ifaces: list[str],
        dst: set[str],
        pod_ns: str | None = None,
        hairpin: bool = False,
    ) -> None:
        a = self.t.nodes.get(node)
        if a is None or (a.prefix == ["false"] and a.run_dir is None):
            return
        flags: dict[str, Any] = {"dst": ",".join(sorted(dst)), "count": 1}
        flags["timeout"] = self.wait + 8
        if not hairpin:  # a hairpinned packet comes back masqueraded: any source
            flags |= {"src": self.t.src.ip, "sport": self.sport}
        argv = agent_argv(a, "sniff", **flags, iface=ifaces, netns=pod_ns)
        self.sniffers.append(Sniffer(probe, key, a.popen(argv)))

    def _start_sniffers(self) -> None:
        """On the source veth, the source node's underlay (to remote candidates), each
        remote candidate's node underlay and each candidate pod's own interface."""
        cv, src = self.t.cv, self.t.src
        if src.veth:
            self._start("src", "*", src.node, [src.veth["name"]], {self.tgt.vip or self.tgt.ip})
        ul = (self.t.src_ov.get("underlay") or {}).get("iface") or "eth0"
        remote = [
            c for c in self.candidates if (x := cv.lease_for_ip(c)) and x.node_name != src.node
        ]
        if remote:
            self._start("out", "*", src.node, [ul], set(remote))
        for c in self.candidates:
            lease = cv.lease_for_ip(c)
            if lease is None:
                continue
            dn = lease.node_name
            if dn != src.node:
                dul = (_ov(self.t.dumps, dn).get("underlay") or {}).get("iface") or "eth0"
                self._start("in", c, dn, [dul], {c})
            pod = cv.pod_by_ip(c)
            pns = _pod_netns(self.t.dumps, dn, pod.namespace, pod.name) if pod else None
            if pns:
                self._start("pod", c, dn, ["eth0"], {c}, pns, hairpin=c == src.ip)

    def _await_ready(self, prog: Progress) -> None:
        deadline = time.monotonic() + 30
        while not all(s.ready for s in self.sniffers) and time.monotonic() < deadline:
            for s in self.sniffers:
                if s.ready:
                    continue
                r, _, _ = select.select([s.proc.stdout], [], [], 0.05)
                if r:
                    ln = s.proc.stdout.readline() if s.proc.stdout else ""
                    if not ln or '"ready"' in ln:
                        s.ready = True  # ready, or exited (its stderr says why)
                    else:
                        s.lines.append(ln)
            prog.step(f"{sum(s.ready for s in self.sniffers)}/{len(self.sniffers)} sniffers ready")

    def _on_source(self, argv: list[str], timeout: float) -> dict[str, Any]:
        """Run an agent verb on the source node: its last JSON line."""
        p = self.t.nodes[self.t.src.node].run(argv, timeout=timeout)
        if not p.stdout.strip():
            return {"result": p.stderr.strip()}
        return json.loads(p.stdout.strip().splitlines()[-1])

    def _send(self) -> dict[str, Any]:
        src, tgt = self.t.src, self.tgt
        acc = self.t.nodes[src.node]
        argv = agent_argv(
            acc, "connect", dst=tgt.ip, proto=tgt.proto, sport=self.sport,
            timeout=self.t.timeout, port=tgt.port or None, netns=src.netns,
        )  # fmt: skip
        try:
            return self._on_source(argv, self.t.timeout + 30)
        except (NodeUnreachable, ValueError) as e:
            return {"result": f"probe failed: {e}"}

    def _conntrack(self) -> list[dict[str, Any]]:
        """The node's conntrack entry of the probe's own flow: the backend it chose."""
        argv = agent_argv(
            self.t.nodes[self.t.src.node], "conntrack", src=self.t.src.ip, dst=self.tgt.vip,
            dport=self.tgt.port or 0, sport=self.sport, proto=self.tgt.proto,
        )  # fmt: skip
        try:
            return self._on_source(argv, 30).get("flows", [])
        except (NodeUnreachable, ValueError, IndexError):
            return []

    def _read(self) -> dict[str, dict[str, str]]:
        """probe id -> {candidate or *: the packet seen, or _error: why not known}."""
        sniffed: dict[str, dict[str, str]] = {}
        end = time.monotonic() + self.wait
        for s in self.sniffers:
            seen = sniffed.setdefault(s.probe, {})
            self._last_line(s, max(0.1, end - time.monotonic()))
            got = None
            for ln in s.lines:
                try:
                    rec = json.loads(ln)
                except ValueError:
                    continue
                if "error" in rec:
                    seen["_error"] = rec["error"]
                elif rec.get("inner"):
                    got = decode.line(rec)
            if got:
                seen[s.key] = got
            try:
                s.proc.wait(2)
            except subprocess.TimeoutExpired:
                s.proc.kill()
            if not seen:
                err = s.proc.stderr.read().strip() if s.proc.stderr else ""
                if err and not s.ready:
                    seen["_error"] = err.splitlines()[-1]
        return sniffed

    @staticmethod
    def _last_line(s: Sniffer, timeout: float) -> None:
        """Wait up to `timeout` for the sniffer's packet, then stop it."""
        try:
            r, _, _ = select.select([s.proc.stdout], [], [], timeout)
            if r and s.proc.stdout is not None and (ln := s.proc.stdout.readline()):
                s.lines.append(ln)
        finally:
            s.proc.terminate()


def print_result(r: Result, out: Out) -> None:
    marks = {
        "confirmed": out.c("✓", "green"),
        "refuted": out.c("✗", "red"),
        "broken": out.c("✗", "red"),
        "planned": out.c("·", "dim"),
        "unchecked": out.c("?", "yellow"),
    }
    out.line(out.c(f"trace {r.source} -> {r.target}", "bold"))
    for i, h in enumerate(r.hops):
        out.line(
            f"{i + 1:>2} {marks.get(h.status, '?')} {h.step:<17} {h.node or '':<16} {h.decision}"
        )
        if h.seen:
            out.line(f"{'':<22}{out.c('probe: ' + h.seen, 'dim')}")
        if r.departure == i and not h.plan_ok:
            out.line(out.c(f"{'':<5}^ the plan breaks here, and so does the probe", "red"))
        elif r.departure == i:
            out.line(out.c(f"{'':<5}^ reality departs from the plan here", "red"))
        elif h.status == "broken":
            out.line(out.c(f"{'':<5}^ the plan itself breaks here", "red"))
    if r.probe:
        p = r.probe
        origin = "echo id" if p.get("proto") == "icmp" else "from port"
        what = f"{p.get('proto', '').upper()} {origin} {p.get('sport')}: {p.get('result')}"
        if p.get("seconds") is not None:
            what += f" in {p['seconds']}s"
        if r.backend:
            what += f"; backend (conntrack) {r.backend}"
        out.line(f"probe: {what}")
    if r.ok:
        out.line(out.c("path as planned", "green"))
