"""`corral net check`: etcd against each node's own view; every difference with its repair.

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
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from corral.api.netconfig import VXLAN_OVERHEAD
from corral.netdebug.model import ClusterView
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


# ------------------------------------------------------------ overlay


def check_overlay(cv: ClusterView, node: str, dump: dict[str, Any], dev: str) -> list[Finding]:
    out: list[Finding] = []
    ov = _component(dump, "overlay")
    if not ov:
        return [Finding(node, "overlay", "the node agent reports no overlay state")]
    if "kernelError" in ov:
        return [
            Finding(node, "overlay", f"the agent could not read the kernel: {ov['kernelError']}")
        ]
    k = ov.get("kernel", {})
    own = cv.lease_of(node)
    device = k.get("device")
    if own is None:
        out.append(Finding(node, "overlay", "no subnet lease in etcd for this node"))
    if device is None:
        out.append(
            Finding(
                node,
                "overlay",
                f"VXLAN device {dev} is missing",
                want=dev,
                have="none",
                fix=f"corral net resync {node}",
                how="resync-node",
            )
        )
        return out
    spec = cv.spec.backend
    local = str(own.public_ip) if own is not None else device.get("local")
    got = (device.get("vni"), device.get("port"), device.get("local"))
    if got != (spec.vni, spec.port, local):
        out.append(
            Finding(
                node,
                "overlay",
                f"{dev} is VNI {got[0]} port {got[1]} local {got[2]}; etcd says VNI {spec.vni} "
                f"port {spec.port} local {local}",
                want=f"vni {spec.vni} port {spec.port} local {local}",
                have=f"vni {got[0]} port {got[1]} local {got[2]}",
                fix=f"corral net resync {node}",
                how="resync-node",
            )
        )
    want_mtu = cv.spec.backend.mtu or ((ov.get("underlayMTU") or 1500) - VXLAN_OVERHEAD)
    if device.get("mtu") != want_mtu:
        argv = ["ip", "link", "set", "dev", dev, "mtu", str(want_mtu)]
        out.append(
            Finding(
                node,
                "overlay",
                f"{dev} MTU is {device.get('mtu')}, the network config asks {want_mtu}",
                want=str(want_mtu),
                have=str(device.get("mtu")),
                how="kernel",
                argv=argv,
            )
        )
    if not device.get("up"):
        out.append(
            Finding(
                node,
                "overlay",
                f"{dev} is down",
                how="kernel",
                argv=["ip", "link", "set", dev, "up"],
            )
        )
    if own is not None and own.vtep_mac and str(device.get("mac")).lower() != own.vtep_mac.lower():
        out.append(
            Finding(
                node,
                "overlay",
                f"{dev} VTEP MAC {device.get('mac')} is not the lease's {own.vtep_mac}",
                want=own.vtep_mac,
                have=str(device.get("mac")),
                how="kernel",
                argv=["ip", "link", "set", "dev", dev, "address", own.vtep_mac],
            )
        )
    if own is not None:
        gw = str(ipaddress.ip_network(own.subnet).network_address)
        if f"{gw}/32" not in device.get("addresses", []):
            out.append(
                Finding(
                    node,
                    "overlay",
                    f"{dev} lacks its address {gw}/32",
                    how="kernel",
                    argv=["ip", "addr", "add", f"{gw}/32", "dev", dev],
                )
            )
    remotes = [x for x in cv.leases.values() if x.node_name != node]
    routes = {r["dst"]: r for r in k.get("routes", [])}
    neigh = {n["ip"]: n for n in k.get("neighbours", [])}
    fdb: dict[str, list[str]] = {}
    for f in k.get("fdb", []):
        fdb.setdefault(str(f["mac"]).lower(), []).append(f["dst"])
    direct = cv.spec.backend.direct_routing
    wanted_routes, wanted_neigh, wanted_fdb = set(), set(), set()
    for r in sorted(remotes, key=lambda x: ipaddress.ip_network(x.subnet)):
        gw = str(ipaddress.ip_network(r.subnet).network_address)
        mac = (r.vtep_mac or "").lower()
        wanted_routes.add(r.subnet)
        if direct:
            continue  # routed on the underlay when on-link: the agent decides; not checked
        wanted_neigh.add(gw)
        wanted_fdb.add(mac)
        have = routes.get(r.subnet)
        if have is None or have.get("gateway") != gw or have.get("dev") != dev:
            out.append(
                Finding(
                    node,
                    "overlay",
                    f"route to {r.subnet} ({r.node_name}) "
                    + (
                        "missing"
                        if have is None
                        else f"is via {have.get('gateway')} dev {have.get('dev')}"
                    ),
                    want=f"{r.subnet} via {gw} dev {dev} onlink",
                    have="none"
                    if have is None
                    else f"via {have.get('gateway')} dev {have.get('dev')}",
                    how="kernel",
                    argv=[
                        "ip",
                        "route",
                        "replace",
                        r.subnet,
                        "via",
                        gw,
                        "dev",
                        dev,
                        "onlink",
                        "proto",
                        "77",
                    ],
                )
            )
        n = neigh.get(gw)
        if n is None or str(n.get("mac")).lower() != mac or n.get("state") != "permanent":
            out.append(
                Finding(
                    node,
                    "overlay",
                    f"neighbour {gw} ({r.node_name}'s VTEP) "
                    + ("missing" if n is None else f"is {n.get('mac')} {n.get('state')}"),
                    want=f"{gw} lladdr {mac} permanent",
                    have="none" if n is None else f"{n.get('mac')} {n.get('state')}",
                    how="kernel",
                    argv=[
                        "ip",
                        "neigh",
                        "replace",
                        gw,
                        "lladdr",
                        mac,
                        "dev",
                        dev,
                        "nud",
                        "permanent",
                    ],
                )
            )
        dsts = fdb.get(mac)
        if dsts != [str(r.public_ip)]:
            out.append(
                Finding(
                    node,
                    "overlay",
                    f"FDB entry {mac} -> {r.public_ip} ({r.node_name}) "
                    + ("missing" if not dsts else f"points at {', '.join(dsts)}"),
                    want=f"{mac} dst {r.public_ip}",
                    have="none" if not dsts else ", ".join(dsts),
                    how="kernel",
                    argv=[
                        "bridge",
                        "fdb",
                        "replace",
                        mac,
                        "dev",
                        dev,
                        "dst",
                        str(r.public_ip),
                        "self",
                        "permanent",
                    ],
                )
            )
    for dst, r in routes.items():
        if r.get("corral") and dst not in wanted_routes and not _service_route(cv, dst):
            out.append(
                Finding(
                    node,
                    "overlay",
                    f"stale route {dst} via {r.get('gateway')} (no lease in etcd)",
                    how="kernel",
                    argv=["ip", "route", "del", dst, "proto", "77"],
                )
            )
    for mac, dsts in fdb.items():
        if mac not in wanted_fdb and not direct:
            for d in dsts:
                out.append(
                    Finding(
                        node,
                        "overlay",
                        f"stale FDB entry {mac} -> {d} (no lease has this VTEP)",
                        how="kernel",
                        argv=["bridge", "fdb", "del", mac, "dev", dev, "dst", d, "self"],
                    )
                )
    for ip, n in neigh.items():
        if ip not in wanted_neigh and n.get("state") == "permanent" and not direct:
            out.append(
                Finding(
                    node,
                    "overlay",
                    f"stale neighbour {ip} -> {n.get('mac')} (no lease has this subnet)",
                    how="kernel",
                    argv=["ip", "neigh", "del", ip, "dev", dev],
                )
            )
    return out


def _service_route(cv: ClusterView, dst: str) -> bool:
    return dst == str(ipaddress.ip_network(cv.spec.service_cidr))


# ------------------------------------------------------------ fast path


def check_fastpath(cv: ClusterView, node: str, dump: dict[str, Any], dev: str) -> list[Finding]:
    ov = _component(dump, "overlay")
    if ov.get("datapath") != "bpf":
        return []
    out: list[Finding] = []
    fix = f"corral net resync {node}"
    links = {link["name"]: link for link in ov.get("links", [])}
    underlay = (ov.get("underlay") or {}).get("iface")
    own = cv.lease_of(node)
    for iface, prog in ((underlay, "from_uplink"), (dev, "from_overlay")):
        link = links.get(iface or "")
        if link is not None and prog not in link.get("programs", []):
            out.append(
                Finding(
                    node,
                    "fastpath",
                    f"{prog} is not attached to {iface}",
                    want=prog,
                    have=",".join(link.get("programs", [])) or "none",
                    fix=fix,
                    how="resync-node",
                )
            )
    pods = []
    for link in links.values():
        pod = link.get("pod")
        if pod is None or not link.get("up"):
            continue
        if own is not None and ipaddress.ip_address(pod["ip"]) not in ipaddress.ip_network(
            own.subnet
        ):
            continue
        pods.append((link, pod))
        if "from_pod" not in link.get("programs", []):
            out.append(
                Finding(
                    node,
                    "fastpath",
                    f"from_pod is not attached to {link['name']} (pod {pod['ip']})",
                    want="from_pod",
                    have=",".join(link.get("programs", [])) or "none",
                    fix=fix,
                    how="resync-node",
                )
            )
    maps = ov.get("fastpathMaps") or {}
    if maps:
        have_peers = {p["gateway"]: p for p in maps.get("peers", [])}
        for r in cv.leases.values():
            if r.node_name == node:
                continue
            gw = str(ipaddress.ip_network(r.subnet).network_address)
            p = have_peers.get(gw)
            if (
                p is None
                or p["underlayIP"] != str(r.public_ip)
                or p["vtepMAC"] != (r.vtep_mac or "").lower()
            ):
                out.append(
                    Finding(
                        node,
                        "fastpath",
                        f"peers map entry for {r.subnet} ({r.node_name}) "
                        + ("missing" if p is None else f"is {p['underlayIP']} {p['vtepMAC']}"),
                        want=f"{gw} -> {r.public_ip} {r.vtep_mac}",
                        have="none" if p is None else f"{p['underlayIP']} {p['vtepMAC']}",
                        fix=fix,
                        how="resync-node",
                    )
                )
        have_pods = {p["ip"]: p for p in maps.get("pods", [])}
        for link, pod in pods:
            p = have_pods.get(pod["ip"])
            if p is None or p["ifindex"] != link["index"]:
                out.append(
                    Finding(
                        node,
                        "fastpath",
                        f"pods map entry for {pod['ip']} "
                        + ("missing" if p is None else f"points at ifindex {p['ifindex']}"),
                        want=f"{pod['ip']} -> ifindex {link['index']} ({link['name']})",
                        have="none" if p is None else f"ifindex {p['ifindex']}",
                        fix=fix,
                        how="resync-node",
                    )
                )
    return out


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


def expected_rules(cv: ClusterView) -> dict[str, R.ServiceRules]:
    return {k: R.service_rules(v, str(cv.spec.network)) for k, v in cv.views().items()}


def check_proxy(cv: ClusterView, node: str, dump: dict[str, Any]) -> list[Finding]:
    px = _component(dump, "proxy")
    fix = f"corral net resync {node} --daemon proxy"
    if not px:
        return [Finding(node, "proxy", "the proxy reports no state")]
    if px.get("mode") not in (None, "iptables"):
        return []  # another mode's state is its own to compare (docs/net.md, Explainers)
    kern = px.get("kernel") or {}
    nat = (kern.get("nat") or {}).get("chains", {})
    hooks = (kern.get("nat") or {}).get("hooks", {})
    filt = (kern.get("filter") or {}).get("chains", {})
    sets = kern.get("ipsets") or {}
    out: list[Finding] = []
    pending = f" ({px['pending']} change(s) not programmed yet)" if px.get("pending") else ""
    for hook in ("PREROUTING", "OUTPUT"):
        if not any(f"-j {R.SERVICES}" in ln for ln in hooks.get(hook, [])):
            out.append(
                Finding(
                    node,
                    "proxy",
                    f"nat {hook} does not jump to {R.SERVICES}",
                    fix=fix,
                    how="resync-proxy",
                )
            )
    want = expected_rules(cv)
    wanted_chains: set[str] = set()
    top = " ".join(nat.get(R.SERVICES, []))
    rejects = " ".join(filt.get(R.SERVICES, []))
    for key, sr in sorted(want.items()):
        for chain, rules in sr.chains.items():
            wanted_chains.add(chain)
            have = nat.get(chain)
            if have is None:
                out.append(
                    Finding(
                        node,
                        "proxy",
                        f"{key}: chain {chain} is missing{pending}",
                        want=f"{len(rules)} rule(s)",
                        have="none",
                        fix=fix,
                        how="resync-proxy",
                    )
                )
            elif _targets(have) != _targets(rules):
                out.append(
                    Finding(
                        node,
                        "proxy",
                        f"{key}: chain {chain} has {len(have)} rule(s), etcd asks {len(rules)}"
                        + (" (flushed?)" if not have else "")
                        + pending,
                        want="; ".join(_targets(rules)),
                        have="; ".join(_targets(have)) or "empty",
                        fix=fix,
                        how="resync-proxy",
                    )
                )
        if sr.bucket is not None and sr.portals:
            bucket = R.bucket_chain(sr.bucket)
            wanted_chains.add(bucket)
            if f"-j {bucket}" not in top:
                out.append(
                    Finding(
                        node,
                        "proxy",
                        f"{key}: no {R.SERVICES} rule jumps to its bucket {bucket}{pending}",
                        fix=fix,
                        how="resync-proxy",
                    )
                )
        for line in sr.portals:
            target = line.split("-j ")[-1].strip()
            bucket = R.bucket_chain(sr.bucket) if sr.bucket is not None else R.SERVICES
            if f"-j {target}" not in " ".join(nat.get(bucket, [])):
                out.append(
                    Finding(
                        node,
                        "proxy",
                        f"{key}: no {bucket} rule jumps to {target}{pending}",
                        want=line,
                        fix=fix,
                        how="resync-proxy",
                    )
                )
        for line in sr.rejects:
            vip = line.split("-d ")[1].split()[0]
            if f"-d {vip}" not in rejects:
                out.append(
                    Finding(
                        node,
                        "proxy",
                        f"{key}: no REJECT for {vip} (a service without endpoints){pending}",
                        want=line,
                        fix=fix,
                        how="resync-proxy",
                    )
                )
        for s in sr.sets:
            if s not in sets:
                out.append(
                    Finding(
                        node,
                        "proxy",
                        f"{key}: affinity set {s} is missing",
                        fix=fix,
                        how="resync-proxy",
                    )
                )
    for chain in sorted(nat):
        if R.owned_chain(chain) and chain not in wanted_chains:
            out.append(
                Finding(
                    node,
                    "proxy",
                    f"stale chain {chain} (no service in etcd needs it){pending}",
                    fix=fix,
                    how="resync-proxy",
                )
            )
    return out


# ------------------------------------------------------------ IPAM and sandboxes


def _age(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return time.time() - t.timestamp()


def pod_veths(dump: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """pod IP -> its host-side veth (the pod-veth alias), from the node agent's links."""
    out = {}
    for link in _component(dump, "overlay").get("links", []):
        if link.get("pod"):
            out[link["pod"]["ip"]] = link
    return out


def check_ipam(cv: ClusterView, dumps: dict[str, NodeDumps]) -> list[Finding]:
    out: list[Finding] = []
    live_pods: dict[str, list[str]] = {}
    for p in cv.pods:
        if p.status.pod_ip and p.status.phase not in ("Succeeded", "Failed"):
            live_pods.setdefault(p.status.pod_ip, []).append(f"{p.namespace}/{p.name}")
    for ip, names in sorted(live_pods.items()):
        if len(names) > 1:
            out.append(Finding(None, "ipam", f"duplicate pod IP {ip}: {', '.join(names)}"))
    by_ip: dict[str, list] = {}
    for a in cv.allocations:
        by_ip.setdefault(a.ip, []).append(a)
    for ip, allocs in sorted(by_ip.items()):
        if len(allocs) > 1:
            out.append(
                Finding(
                    None,
                    "ipam",
                    f"IP {ip} allocated in {len(allocs)} pools: "
                    + ", ".join(a.key for a in allocs),
                )
            )
    veths_by_node = {n: pod_veths(d.node) for n, d in dumps.items() if d.node is not None}
    for a in cv.allocations:
        node = a.alloc.node_name
        if a.owner_key not in cv.owners:
            out.append(
                Finding(
                    node,
                    "ipam",
                    f"allocation {a.ip} has no owner key ({a.owner_key})",
                    fix=f"corral net ipam --release {a.ip}",
                    how="release",
                    key=a.key,
                )
            )
            continue
        if node not in veths_by_node:
            continue  # the node did not answer: its sandboxes are unknown
        if a.ip in veths_by_node[node] or a.ip in live_pods:
            continue
        age = _age(a.alloc.created_at)
        if age is not None and age < LEAK_GRACE:
            continue
        owner = (
            f"{a.alloc.pod_namespace}/{a.alloc.pod_name}"
            if a.alloc.pod_name
            else a.alloc.container_id[:12]
        )
        out.append(
            Finding(
                node,
                "ipam",
                f"leaked IP {a.ip} (pool {a.alloc.pool}, owner {owner}): no pod has it and no "
                f"sandbox on {node} uses it",
                want="free",
                have=f"allocated to container {a.alloc.container_id[:12]}",
                fix=f"corral net ipam --release {a.ip}",
                how="release",
                key=a.key,
            )
        )
    for node, d in sorted(dumps.items()):
        pods = _component(d.node, "pods").get("pods", {})
        veths = veths_by_node.get(node, {})
        for key, p in sorted(pods.items()):
            ip = p.get("ip")
            down = p.get("gone") or p.get("terminating") or p.get("networkDown")
            if ip and not down and ip not in veths:
                ns, _, name = key.partition("/")
                out.append(
                    Finding(
                        node,
                        "ipam",
                        f"pod {key}'s sandbox has IP {ip} but no veth on {node} carries it: "
                        "the pod has lost its network",
                        fix=f"corral delete pod {name} -n {ns} (its replacement is wired afresh)",
                        how=None,
                    )
                )
    allocated = {a.ip for a in cv.allocations}
    for node, veths in sorted(veths_by_node.items()):
        own = cv.lease_of(node)
        for ip, link in sorted(veths.items()):
            if ip in allocated:
                continue
            if own is not None and ipaddress.ip_address(ip) not in ipaddress.ip_network(own.subnet):
                continue  # an explicit range outside the node subnet: another pool's
            users = live_pods.get(ip)
            if users:
                out.append(
                    Finding(
                        node,
                        "ipam",
                        f"IP {ip} is in use by {', '.join(users)} (veth {link['name']}) but not "
                        "allocated in etcd: another pod may be given it too",
                        fix=f"corral delete pod {users[0].split('/', 1)[1]} -n "
                        f"{users[0].split('/', 1)[0]} (its replacement gets a fresh allocation)",
                        how=None,
                    )
                )
                continue
            out.append(
                Finding(
                    node,
                    "ipam",
                    f"orphan veth {link['name']} (pod IP {ip}): no allocation in etcd",
                    fix=f"ip link del {link['name']}",
                    how=None,
                )
            )
    return out


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
