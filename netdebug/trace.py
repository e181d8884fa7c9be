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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.netdebug import check, explain
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


def trace(
    cv: ClusterView,
    nodes: dict[str, NodeAccess],
    source: str,
    target: str,
    probe: bool = True,
    timeout: float = 3.0,
    collect: Callable[..., dict[str, check.NodeDumps]] | None = None,
) -> Result:
    ns, _, name = source.rpartition("/")
    ns = ns or "default"
    src = cv.pod(name, ns)
    if src is None:
        raise TraceError(f"pod {ns}/{name} not found (corral get pods -n {ns})")
    if not src.spec.node_name or not src.status.pod_ip:
        raise TraceError(f"pod {ns}/{name} has no node or IP yet ({src.status.phase})")
    m = _TARGET.match(target)
    if not m:
        raise TraceError(
            f"TO {target!r}: give a pod, service, DNS name, VIP or IP, optionally :PORT and "
            "/tcp, /udp or /icmp (e.g. web:80/tcp)"
        )
    host, port, proto = m["host"], int(m["port"]) if m["port"] else None, (m["proto"] or "").lower()
    src_node, src_ip = src.spec.node_name, str(src.status.pod_ip)
    assert collect is not None
    dumps = collect(nodes)
    d = dumps.get(src_node)
    if d is None or d.node is None:
        raise TraceError(
            f"source node {src_node} unreachable: {d.node_error if d else 'not in the cluster'}"
        )
    hops: list[Hop] = []
    src_veth = _veth_of(dumps, src_node, src_ip)
    netns = _pod_netns(dumps, src_node, ns, name)
    hops.append(
        Hop(
            "source pod",
            src_node,
            f"{ns}/{name} {src_ip}, host veth {src_veth['name'] if src_veth else '?'}",
            {"veth": src_veth, "netns": netns},
            probe="src" if src_veth else None,
            status="planned" if src_veth else "broken",
        )
    )
    # ---- what TO is
    ip: str | None = None
    shown = host
    try:
        ip = str(ipaddress.IPv4Address(host))
    except ValueError:
        svc = cv.service(host, ns)
        pod = cv.pod(host, ns)
        if svc is not None and svc.spec.cluster_ip:
            ip = svc.spec.cluster_ip
            if port is None and svc.spec.ports:
                port = svc.spec.ports[0].port
                proto = proto or svc.spec.ports[0].protocol.lower()
        elif pod is not None and pod.status.pod_ip:
            ip = str(pod.status.pod_ip)
        elif "." in host:
            ip = _resolve(cv, nodes[src_node], netns, host, hops)
            if ip is None:
                return Result(f"{ns}/{name}", target, hops)
        else:
            raise TraceError(
                f"TO {host!r}: no pod or service of that name in namespace {ns}"
            ) from None
    proto = proto or ("tcp" if port else "icmp")
    if proto != "icmp" and port is None:
        raise TraceError(f"TO {target!r}: give a port for {proto} (e.g. {host}:80/{proto})")
    result = Result(f"{ns}/{name}", f"{shown}:{port}/{proto}" if port else f"{shown}/{proto}", hops)
    # ---- the service decision
    vip = None
    candidates = [ip]
    if ipaddress.ip_address(ip) in ipaddress.ip_network(cv.spec.service_cidr):
        vip = ip
        svc = cv.service_by_ip(ip)
        if d.proxy is None:
            hops.append(
                Hop("service", src_node, f"proxy unreachable: {d.proxy_error}", status="broken")
            )
            return result
        ex = explain.explainer(d.proxy)
        dec = ex.decide(explain.proxy_state(d.proxy), ip, port or 0, proto, src_ip)
        what = f"{svc.namespace}/{svc.name}" if svc else "no Service in etcd has this VIP"
        hops.append(
            Hop(
                "service",
                src_node,
                f"{what} {ip}:{port}/{proto}: {dec.why}",
                {"mode": ex.mode, "rule": dec.rule, "candidates": dec.candidates, **dec.state},
                probe="conntrack" if dec.candidates else "refused",
                status="planned" if dec.found else "broken",
            )
        )
        result.planned_backend = dec.backend
        if not dec.found:
            return result
        if not dec.candidates:
            if probe:
                result.probe = _probe(
                    cv,
                    nodes,
                    dumps,
                    src_node,
                    src_ip,
                    netns,
                    src_veth,
                    ip,
                    vip,
                    port,
                    proto,
                    [],
                    timeout,
                )
                refused = result.probe.get("result") in ("refused", "no reply")
                hops[-1].status = "confirmed" if refused else "refuted"
                hops[-1].seen = f"the probe was {result.probe.get('result')}"
                result.departure = None if refused else len(hops) - 1
            return result
        candidates = [
            b.rsplit(":", 1)[0] for b in ([dec.backend] if dec.backend else dec.candidates)
        ]
    # ---- probe first when the backend is random, then plan the path it took
    probed: dict[str, Any] = {}
    if probe:
        probed = _probe(
            cv,
            nodes,
            dumps,
            src_node,
            src_ip,
            netns,
            src_veth,
            ip,
            vip,
            port,
            proto,
            candidates,
            timeout,
        )
        result.probe = {k: v for k, v in probed.items() if k != "sniffed"}
    dest = candidates[0]
    if vip and probe:
        flows = probed.get("conntrack") or []
        if flows:
            result.backend = f"{flows[0]['backend']}:{flows[0]['backendPort']}"
            dest = flows[0]["backend"]
            h = hops[-1]
            if result.planned_backend and result.planned_backend != result.backend:
                h.status, h.seen = "refuted", f"conntrack: the node chose {result.backend}"
            else:
                h.status, h.seen = "confirmed", f"conntrack: the node chose {result.backend}"
        else:
            hops[-1].status = "refuted"
            hops[-1].seen = "no conntrack entry for the probe's flow on " + src_node
    elif vip and result.planned_backend:
        dest = result.planned_backend.rsplit(":", 1)[0]
    hops += _path(cv, dumps, src_node, src_ip, src_veth, dest, bool(vip))
    if probe:
        sniffed = probed.get("sniffed", {})
        for h in hops:
            if h.probe in sniffed:
                got = sniffed[h.probe].get(dest) or sniffed[h.probe].get("*")
                if got:
                    h.status, h.seen = "confirmed", got
                elif sniffed[h.probe].get("_error"):
                    h.status, h.seen = "unchecked", sniffed[h.probe]["_error"]
                else:
                    h.status, h.seen = "refuted", "the probe's packet was not seen here"
        result.departure = next(
            (i for i, h in enumerate(hops) if h.status in ("refuted", "broken")), None
        )
    else:
        result.departure = next((i for i, h in enumerate(hops) if h.status == "broken"), None)
    return result


def _resolve(
    cv: ClusterView, acc: NodeAccess, netns: str | None, name: str, hops: list[Hop]
) -> str | None:
    server = str(cv.spec.cluster_dns)
    argv = [
        acc.python,
        "-m",
        "corral.netdebug.agent",
        "resolve",
        "--name",
        name,
        "--server",
        server,
    ]
    if netns:
        argv += ["--netns", netns]
    try:
        p = acc.run(argv, timeout=20)
        doc = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
    except (NodeUnreachable, ValueError) as e:
        doc = {"error": str(e)}
    if doc.get("answers"):
        ip = doc["answers"][0]
        hops.append(
            Hop(
                "dns",
                acc.name,
                f"{name} -> {ip} (cluster DNS {server}, TTL {doc.get('ttl')})",
                doc,
                status="confirmed",
            )
        )
        return ip
    err = doc.get("error") or (p.stderr.strip() if "p" in locals() else "no answer")
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


def _path(
    cv: ClusterView,
    dumps: dict[str, check.NodeDumps],
    src_node: str,
    src_ip: str,
    src_veth: dict[str, Any] | None,
    dest: str,
    via_vip: bool,
) -> list[Hop]:
    hops: list[Hop] = []
    lease = cv.lease_for_ip(dest)
    pod = cv.pod_by_ip(dest)
    pod_name = f"{pod.namespace}/{pod.name}" if pod else "no pod in etcd"
    ov = _ov(dumps, src_node)
    maps = ov.get("fastpathMaps") or {}
    bpf = ov.get("datapath") == "bpf"
    on_veth = src_veth is not None and "from_pod" in (src_veth.get("programs") or [])
    if lease is None:
        hops.append(
            Hop(
                "routing",
                src_node,
                f"{dest} is in no node's subnet: the node's own routes "
                "(masqueraded if it leaves the cluster network)",
                status="planned",
            )
        )
        return hops
    dnode = lease.node_name
    dev = cv.device
    kern = ov.get("kernel") or {}
    if dnode == src_node:
        local = next((p for p in maps.get("pods", []) if p["ip"] == dest), None)
        if bpf and on_veth and local and not via_vip:
            why = (
                f"fast path: from_pod finds {dest} in the pods map "
                f"(ifindex {local['ifindex']}) and redirects to it"
            )
        else:
            why = "kernel: the cni0 bridge delivers it to the pod's veth" + (
                " (DNATed by netfilter, so not on the fast path)" if via_vip else ""
            )
        hops.append(
            Hop("routing", src_node, f"{dest} is on this node ({lease.subnet}); {why}", probe="src")
        )
    else:
        gw = str(ipaddress.ip_network(lease.subnet).network_address)
        peer = next((p for p in maps.get("peers", []) if p["gateway"] == gw), None)
        route = next((r for r in kern.get("routes", []) if r["dst"] == lease.subnet), None)
        neigh = next((n for n in kern.get("neighbours", []) if n["ip"] == gw), None)
        mac = (neigh or {}).get("mac") or (peer or {}).get("vtepMAC")
        fdb = [f["dst"] for f in kern.get("fdb", []) if mac and f["mac"] == mac]
        if bpf and on_veth and peer and not via_vip:
            path = "fast path"
            why = (
                f"from_pod on {src_veth['name']} encapsulates itself: peers map {gw} -> "
                f"{peer['underlayIP']} VTEP {peer['vtepMAC']}, out of the underlay"
            )
            broken = False
        else:
            path = "kernel"
            reasons = []
            if not bpf:
                reasons.append(f"datapath kernel ({ov.get('datapathWhy') or 'fast path off'})")
            elif via_vip:
                reasons.append(
                    "the packet was DNATed by netfilter (iptables proxy), after the veth's program"
                )
            elif not on_veth:
                reasons.append(
                    f"from_pod is not attached to {src_veth['name'] if src_veth else 'the veth'}"
                )
            elif not peer:
                reasons.append(f"no peers map entry for {gw}")
            why = f"{'; '.join(reasons)}: route " + (
                f"{route['dst']} via {route['gateway']} dev {route['dev']}"
                f"{' onlink' if route['onlink'] else ''}"
                if route
                else f"to {lease.subnet} MISSING"
            )
            broken = route is None
        hops.append(
            Hop(
                "routing",
                src_node,
                f"{path}: {why}",
                {"route": route, "peer": peer},
                probe="src",
                status="broken" if broken else "planned",
            )
        )
        want_ip = str(lease.public_ip)
        vtep_ok = path == "fast path" or (neigh is not None and fdb == [want_ip])
        hops.append(
            Hop(
                "vxlan encap",
                src_node,
                f"VNI {cv.spec.backend.vni}: inner {src_ip} > {dest}, VTEP MAC {mac or 'MISSING'}"
                + (f" (neighbour {gw} {neigh['state']})" if neigh else "")
                + f", FDB {mac} -> {', '.join(fdb) or 'MISSING'}; "
                + f"outer {cv.node_ip(src_node)} > {want_ip}"
                + (
                    ""
                    if path == "kernel"
                    else " (the fast path's own copy of these, from the peers map)"
                ),
                {
                    "neighbour": neigh,
                    "fdb": fdb,
                    "lease": {"node": dnode, "publicIP": want_ip, "vtepMAC": lease.vtep_mac},
                },
                probe="out",
                status="planned" if vtep_ok else "broken",
            )
        )
        dov = _ov(dumps, dnode)
        dmaps = dov.get("fastpathMaps") or {}
        dlinks = {link["name"]: link for link in dov.get("links", [])}
        ul = (dov.get("underlay") or {}).get("iface")
        dpod = next((p for p in dmaps.get("pods", []) if p["ip"] == dest), None)
        if not dov:
            text = f"{dnode} ({want_ip}): its node agent is unreachable, decapsulation unknown"
        elif (
            dov.get("datapath") == "bpf"
            and "from_uplink" in (dlinks.get(ul or "", {}).get("programs") or [])
            and dpod
        ):
            text = (
                f"{dnode} ({want_ip}) on {ul}: from_uplink decapsulates and redirects into "
                f"the pod (pods map ifindex {dpod['ifindex']})"
            )
        else:
            text = (
                f"{dnode} ({want_ip}) on {ul}: {dev} decapsulates, the kernel routes to "
                "cni0 and the pod's veth"
            )
        hops.append(Hop("destination node", dnode, text, probe="in"))
    dnode_veth = _veth_of(dumps, dnode, dest)
    hairpin = " (hairpin: the pod is its own backend; the node masquerades the source)"
    hops.append(
        Hop(
            "destination pod",
            dnode,
            f"{pod_name} {dest} behind veth {dnode_veth['name'] if dnode_veth else 'MISSING'}"
            + (hairpin if dest == src_ip else ""),
            {"veth": dnode_veth},
            probe="pod",
            status="planned" if dnode_veth else "broken",
        )
    )
    return hops


def _probe(
    cv: ClusterView,
    nodes: dict[str, NodeAccess],
    dumps: dict[str, check.NodeDumps],
    src_node: str,
    src_ip: str,
    netns: str | None,
    src_veth: dict[str, Any] | None,
    ip: str,
    vip: str | None,
    port: int | None,
    proto: str,
    candidates: list[str],
    timeout: float,
) -> dict[str, Any]:
    """Start the sniffers, send one real packet from the pod, read what each saw."""
    sport = random.randint(40000, 59999)
    acc = nodes[src_node]
    wait = timeout + 2
    sniffers: list[tuple[str, str, Any]] = []  # (probe id, candidate or *, Popen)

    def start(
        pid: str,
        key: str,
        node: str,
        ifaces: list[str],
        dst: set[str],
        pod_ns: str | None = None,
        hairpin: bool = False,
    ) -> None:
        a = nodes.get(node)
        if a is None or (a.prefix == ["false"] and a.run_dir is None):
            return
        argv = [
            a.python,
            "-m",
            "corral.netdebug.agent",
            "sniff",
            "--dst",
            ",".join(sorted(dst)),
            "--count",
            "1",
            "--timeout",
            str(wait + 8),
        ]
        if not hairpin:  # a hairpinned packet comes back masqueraded: any source
            argv += ["--src", src_ip, "--sport", str(sport)]
        for i in ifaces:
            argv += ["--iface", i]
        if pod_ns:
            argv += ["--netns", pod_ns]
        sniffers.append((pid, key, a.popen(argv)))

    first_dst = {vip or ip}
    if src_veth:
        start("src", "*", src_node, [src_veth["name"]], first_dst)
    ul = (_ov(dumps, src_node).get("underlay") or {}).get("iface") or "eth0"
    remote = [c for c in candidates if (x := cv.lease_for_ip(c)) and x.node_name != src_node]
    if remote:
        start("out", "*", src_node, [ul], set(remote))
    for c in candidates:
        lease = cv.lease_for_ip(c)
        pod = cv.pod_by_ip(c)
        if lease is None:
            continue
        dn = lease.node_name
        if dn != src_node:
            dul = (_ov(dumps, dn).get("underlay") or {}).get("iface") or "eth0"
            start("in", c, dn, [dul], {c})
        pns = _pod_netns(dumps, dn, pod.namespace, pod.name) if pod else None
        if pns:
            start("pod", c, dn, ["eth0"], {c}, pns, hairpin=c == src_ip)
    out: dict[str, Any] = {"sport": sport, "sniffed": {}}
    with Progress("probing: starting sniffers") as prog:
        deadline = time.monotonic() + 30
        pending = {id(p): (pid, key, p) for pid, key, p in sniffers}
        lines: dict[int, list[str]] = {k: [] for k in pending}
        ready: set[int] = set()
        while len(ready) < len(pending) and time.monotonic() < deadline:
            for k, (_, _, p) in pending.items():
                if k in ready:
                    continue
                r, _, _ = select.select([p.stdout], [], [], 0.05)
                if r:
                    ln = p.stdout.readline()
                    if not ln:
                        ready.add(k)  # exited: its stderr says why
                    elif '"ready"' in ln:
                        ready.add(k)
                    else:
                        lines[k].append(ln)
            prog.step(f"{len(ready)}/{len(pending)} sniffers ready")
        prog.step("sending the probe")
        argv = [
            acc.python,
            "-m",
            "corral.netdebug.agent",
            "connect",
            "--dst",
            ip,
            "--proto",
            proto,
            "--sport",
            str(sport),
            "--timeout",
            str(timeout),
        ]
        if port:
            argv += ["--port", str(port)]
        if netns:
            argv += ["--netns", netns]
        try:
            p = acc.run(argv, timeout=timeout + 30)
            res = (
                json.loads(p.stdout.strip().splitlines()[-1])
                if p.stdout.strip()
                else {"result": p.stderr.strip()}
            )
        except (NodeUnreachable, ValueError) as e:
            res = {"result": f"probe failed: {e}"}
        out.update(res)
        if vip and proto != "icmp":
            cargv = [
                acc.python,
                "-m",
                "corral.netdebug.agent",
                "conntrack",
                "--src",
                src_ip,
                "--dst",
                vip,
                "--dport",
                str(port or 0),
                "--sport",
                str(sport),
                "--proto",
                proto,
            ]
            try:
                cp = acc.run(cargv, timeout=30)
                out["conntrack"] = json.loads(cp.stdout.strip().splitlines()[-1]).get("flows", [])
            except (NodeUnreachable, ValueError, IndexError):
                out["conntrack"] = []
        prog.step("reading the sniffers")
        end = time.monotonic() + wait
        for k, (pid, key, p) in pending.items():
            left = max(0.1, end - time.monotonic())
            got = None
            try:
                r, _, _ = select.select([p.stdout], [], [], left)
                if r:
                    ln = p.stdout.readline()
                    if ln:
                        lines[k].append(ln)
            finally:
                p.terminate()
            for ln in lines[k]:
                try:
                    rec = json.loads(ln)
                except ValueError:
                    continue
                if "error" in rec:
                    out["sniffed"].setdefault(pid, {})["_error"] = rec["error"]
                elif rec.get("inner"):
                    from corral.netdebug.decode import line

                    got = line(rec)
            if got:
                out["sniffed"].setdefault(pid, {})[key] = got
            else:
                out["sniffed"].setdefault(pid, {})
            try:
                p.wait(2)
            except Exception:
                p.kill()
            if pid not in out["sniffed"] or not out["sniffed"][pid]:
                err = p.stderr.read().strip() if p.stderr else ""
                if err and k not in ready:
                    out["sniffed"][pid]["_error"] = err.splitlines()[-1]
    return out


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
