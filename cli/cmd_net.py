"""`corral net`: debug pod networking from etcd and each node's own view.

Verbs: check, trace, policy, ipam, services, capture, resync. The logic lives in
`corral.netdebug`; this module parses flags, finds the nodes (the local
cluster's, this machine, or `--via`) and prints. See docs/net.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import sys
from typing import Any

from corral.api.store import Store
from corral.cli.common import CLIError, etcd_endpoints, run, store_from_args
from corral.netdebug import access, check, explain, model, render
from corral.netdebug.access import NodeAccess, NodeUnreachable


def _common(p: argparse.ArgumentParser, node: bool = True) -> None:
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    if node:
        p.add_argument("--node", default=None, help="only this node (name, or its number)")
    p.add_argument(
        "--via",
        default=os.environ.get("CORRAL_NET_VIA"),
        metavar="TEMPLATE",
        help="reach nodes by running commands through TEMPLATE, e.g. 'ssh root@{ip}' "
        "({node} and {ip} are filled in; default $CORRAL_NET_VIA; without it: the local "
        "cluster's nodes, or this machine)",
    )
    p.add_argument(
        "--node-python",
        default=os.environ.get("CORRAL_NET_PYTHON") or "python3",
        metavar="PATH",
        help="with --via: the interpreter on the nodes that has corral installed "
        "(default $CORRAL_NET_PYTHON, else python3)",
    )
    p.add_argument(
        "--cluster",
        default=os.environ.get("CORRAL_CLUSTER") or "corral",
        help="the local cluster's name (default $CORRAL_CLUSTER, else corral)",
    )


def register(sub: Any) -> None:
    net = sub.add_parser(
        "net", help="debug pod networking: check, trace, policy, ipam, services, capture"
    )
    verbs = net.add_subparsers(dest="net_verb", metavar="VERB")

    p = verbs.add_parser("check", help="compare etcd with every node's kernel; exit 1 on drift")
    _common(p)
    p.add_argument("--fix", action="store_true", help="repair what is safe; say what is left")
    p.set_defaults(func=cmd_check)

    p = verbs.add_parser(
        "trace",
        help="the path a connection takes, decision by decision, then a real probe",
        usage="corral net trace FROM TO[:PORT][/PROTO]",
    )
    _common(p, node=False)
    p.add_argument("source", metavar="FROM", help="a pod ([NAMESPACE/]NAME)")
    p.add_argument(
        "target",
        metavar="TO[:PORT][/PROTO]",
        help="a pod, a service, a DNS name, a VIP or an IP; PORT and PROTO (tcp, udp, icmp)",
    )
    p.add_argument("--no-probe", action="store_true", help="the plan only, send nothing")
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for probe packets (default 3)"
    )
    p.set_defaults(func=cmd_trace)

    p = verbs.add_parser("ipam", help="pool usage per node subnet, allocations and owners, leaks")
    _common(p)
    p.add_argument("--release", metavar="IP", help="free a leaked allocation (refused if in use)")
    p.set_defaults(func=cmd_ipam)

    p = verbs.add_parser("services", help="the service table as each node's proxy programmed it")
    _common(p)
    p.set_defaults(func=cmd_services)

    p = verbs.add_parser(
        "policy",
        help="a pod's effective NetworkPolicy: ingress and egress, and what its node programmed",
        usage="corral net policy [NAMESPACE/]POD [-n NAMESPACE]",
    )
    _common(p, node=False)
    p.add_argument("pod", metavar="POD", help="a pod ([NAMESPACE/]NAME)")
    p.add_argument("-n", "--namespace", default=None, help="the pod's namespace (default: default)")
    p.set_defaults(func=cmd_policy)

    p = verbs.add_parser(
        "capture",
        help="live VXLAN-decoding capture on a node's underlay and pod veths",
        usage="corral net capture --node N [--pod P] [--vni V] [-w FILE] [-c COUNT] [--duration S]",
    )
    _common(p)
    p.add_argument("--pod", help="only this pod's traffic (its veth, and its IP on the underlay)")
    p.add_argument("--vni", type=int, help="only VXLAN packets of this VNI")
    p.add_argument("-w", "--write", metavar="FILE", help="also write a pcap (Wireshark opens it)")
    p.add_argument("-c", "--count", type=int, default=0, help="stop after COUNT packets")
    p.add_argument("--duration", type=float, default=0, help="stop after SECONDS")
    p.set_defaults(func=cmd_capture)

    p = verbs.add_parser(
        "resync", help="ask a node's daemon for a full repair pass now (what --fix uses)"
    )
    p.add_argument("node_name", metavar="NODE")
    p.add_argument("--daemon", choices=("node", "proxy"), default="node")
    _common(p, node=False)
    p.set_defaults(func=cmd_resync)
    net.set_defaults(func=lambda a: (net.print_help(), 2)[1])


# ------------------------------------------------------------ reaching nodes


def _local_nodes(args: argparse.Namespace) -> dict[str, NodeAccess] | None:
    """The local cluster's nodes, when the etcd in use is the local cluster's."""
    if getattr(args, "etcd", None) or os.environ.get("CORRAL_ETCD"):
        return None
    from corral.cluster import local, nodes
    from corral.node.procs import start_time

    try:
        s = local.load_state(args.cluster)
    except (OSError, ValueError):
        return None
    if s is None:
        return None
    out = {}
    for n in s.nodes:
        base = s.node_dir(n.name)
        alive = n.holder is not None and start_time(n.holder.pid) == n.holder.started
        prefix = nodes.exec_argv(n.holder.pid, [], cwd="/") if alive and n.holder else ["false"]
        out[n.name] = NodeAccess(
            n.name,
            n.ip,
            os.path.join(base, "run"),
            prefix,
            sys.executable,
            how=f"local cluster {s.name}",
            netns_dir=os.path.join(base, "netns"),
            paste=f"corral node-exec {n.name} --",
        )
    return out


def node_accesses(args: argparse.Namespace, cv: model.ClusterView) -> dict[str, NodeAccess]:
    names = sorted(set(cv.nodes) | {x.node_name for x in cv.leases.values()})
    if args.via:
        try:
            return {n: access.via(n, cv.node_ip(n), args.via, args.node_python) for n in names}
        except ValueError as e:
            raise CLIError(str(e)) from None
    local = _local_nodes(args)
    if local is not None:
        return {n: local[n] for n in names if n in local} | {
            n: NodeAccess(n, cv.node_ip(n), None, ["false"], how="not a node of the local cluster")
            for n in names
            if n not in local
        }
    here = os.environ.get("CORRAL_NODE") or socket.gethostname()
    out = {}
    for n in names:
        if n == here:
            out[n] = access.this_machine(n, cv.node_ip(n))
        else:
            out[n] = NodeAccess(
                n,
                cv.node_ip(n),
                None,
                ["false"],
                how="not this machine (use --via 'ssh root@{ip}' to reach it)",
            )
    return out


def _pick(nodes: dict[str, NodeAccess], want: str | None) -> dict[str, NodeAccess]:
    if not want:
        return nodes
    if want in nodes:
        return {want: nodes[want]}
    short = [n for n in nodes if n.endswith(f"-{want}") or n.endswith(f"node-{want}")]
    if len(short) == 1:
        return {short[0]: nodes[short[0]]}
    raise CLIError(f"--node {want}: no such node; nodes are {', '.join(sorted(nodes)) or 'none'}")


def collect(
    nodes: dict[str, NodeAccess], daemons: tuple[str, ...] = ("node", "proxy")
) -> dict[str, check.NodeDumps]:
    """Every node's dumps, in parallel, with a progress line when it takes long."""
    out = {n: check.NodeDumps() for n in nodes}

    def one(name: str, daemon: str) -> None:
        acc = nodes[name]
        if acc.prefix == ["false"] and acc.run_dir is None:
            setattr(out[name], f"{daemon}_error", f"unreachable: {acc.how}")
            return
        try:
            setattr(out[name], daemon, acc.query(daemon))
        except NodeUnreachable as e:
            setattr(out[name], f"{daemon}_error", str(e))

    workers = min(8, 2 * len(nodes) or 1)
    with (
        render.Progress("reading nodes' state") as prog,
        concurrent.futures.ThreadPoolExecutor(workers) as pool,
    ):
        futs = [pool.submit(one, n, d) for n in nodes for d in daemons]
        for i, f in enumerate(concurrent.futures.as_completed(futs)):
            f.result()
            prog.step(f"{i + 1}/{len(futs)} answered")
    return out


async def _cluster(args: argparse.Namespace) -> model.ClusterView:
    async with store_from_args(args) as store:
        return await model.read(store)


def _read_cluster(args: argparse.Namespace) -> model.ClusterView:
    with render.Progress(f"reading etcd at {','.join(etcd_endpoints(args))}"):
        return run(lambda: _cluster(args))


# ------------------------------------------------------------ check


def _fix_text(f: check.Finding, nodes: dict[str, NodeAccess]) -> str | None:
    if f.argv and f.node in nodes:
        return nodes[f.node].shown(f.argv)
    return f.fix


def cmd_check(args: argparse.Namespace) -> int:
    cv = _read_cluster(args)
    nodes = _pick(node_accesses(args, cv), args.node)
    dumps = collect(nodes)
    findings = check.check(cv, dumps)
    fixed: list[tuple[check.Finding, str]] = []
    left: list[tuple[check.Finding, str]] = []
    if args.fix and findings:
        fixed, left = apply_fixes(args, findings, nodes)
    if args.output == "json":
        render.dump_json(
            {
                "nodes": sorted(nodes),
                "findings": [f.as_dict() | {"fix": _fix_text(f, nodes)} for f in findings],
                "fixed": [f.what for f, _ in fixed],
                "left": [{"what": f.what, "why": why} for f, why in left],
            }
        )
    else:
        out = render.Out()
        if not findings:
            out.line(out.c("✓", "green") + f" {len(nodes)} node(s) match etcd: nothing differs")
        for f in findings:
            where = f.node or "cluster"
            out.line(f"{out.c('✗', 'red')} {where:<16} {f.area:<9} {f.what}")
            if f.want or f.have:
                out.line(f"    want {f.want or '-'}; have {f.have or '-'}")
            fix = _fix_text(f, nodes)
            if fix:
                out.line("    fix: " + out.c(fix, "bold"))
        if args.fix and findings:
            for f, how in fixed:
                out.line(out.c("fixed", "green") + f": {f.what} ({how})")
            for f, why in left:
                out.line(out.c("left", "yellow") + f": {f.what} ({why})")
    if args.fix and findings:
        return 1 if left else 0
    return 1 if findings else 0


def apply_fixes(
    args: argparse.Namespace, findings: list[check.Finding], nodes: dict[str, NodeAccess]
) -> tuple[list[tuple[check.Finding, str]], list[tuple[check.Finding, str]]]:
    fixed, left = [], []
    resynced: dict[tuple[str, str], str | None] = {}
    releases = []
    for f in findings:
        acc = nodes.get(f.node or "")
        if f.how == "kernel" and acc is not None and f.argv:
            try:
                p = acc.run(f.argv)
            except NodeUnreachable as e:
                left.append((f, str(e)))
                continue
            if p.returncode == 0:
                fixed.append((f, "ran " + " ".join(f.argv)))
            else:
                left.append((f, f"{' '.join(f.argv)} failed: {p.stderr.strip()}"))
        elif f.how in ("resync-node", "resync-proxy") and acc is not None:
            daemon = "node" if f.how == "resync-node" else "proxy"
            k = (acc.name, daemon)
            if k not in resynced:
                try:
                    acc.query(daemon, request="resync")
                    resynced[k] = None
                except NodeUnreachable as e:
                    resynced[k] = str(e)
            if resynced[k] is None:
                fixed.append((f, f"asked {acc.name}'s {daemon} daemon for a full repair"))
            else:
                left.append((f, str(resynced[k])))
        elif f.how == "release" and f.key:
            releases.append(f)
        else:
            left.append((f, "not safe to repair blind" if f.fix else "no automatic repair"))
    if releases:
        for f, why in run(lambda: _release_all(args, releases)):
            (fixed if why.startswith("released") else left).append((f, why))
    # Verify: what still differs is left, whatever was tried.
    still = _recheck(args, findings, nodes, wait=bool(resynced))
    verified = [(f, how) for f, how in fixed if (f.node, f.what) not in still]
    left += [(f, f"tried ({how}), still differs") for f, how in fixed if (f.node, f.what) in still]
    return verified, left


def _recheck(
    args: argparse.Namespace,
    findings: list[check.Finding],
    nodes: dict[str, NodeAccess],
    wait: bool,
) -> set[tuple[str | None, str]]:
    """Check again (for daemons' repair passes: until they are done, up to ~10 s)."""
    import time

    deadline = time.monotonic() + (10 if wait else 0)
    wanted = {(f.node, f.what) for f in findings}
    with render.Progress("checking the repairs"):
        while True:
            cv = _read_cluster(args)
            again = check.check(cv, collect(nodes))
            still = wanted & {(f.node, f.what) for f in again}
            if not still or time.monotonic() >= deadline:
                return still
            time.sleep(0.5)


async def _release_all(
    args: argparse.Namespace, findings: list[check.Finding]
) -> list[tuple[check.Finding, str]]:
    out = []
    async with store_from_args(args) as store:
        for f in findings:
            out.append((f, await release(store, f.key or "")))
    return out


async def release(store: Store, key: str) -> str:
    """Delete a leaked allocation's IP key and owner key together, if unchanged."""
    from corral.api.objects import IPAllocation

    kv = await store.get_raw(key)
    if kv is None:
        return "already gone"
    a = IPAllocation.model_validate_json(kv.value)
    pool = key.split("/ipam/", 1)[1].split("/", 1)[0]
    owner = key.split("/ipam/", 1)[0] + f"/ipam/{pool}/owners/{a.container_id}/{a.ifname}"
    ok, _ = await store.txn(
        compare=[("mod", key, "==", kv.mod_revision)],
        success=[("delete", key), ("delete", owner)],
    )
    return f"released {a.ip} of pool {pool}" if ok else "changed meanwhile; left alone"


# ------------------------------------------------------------ resync


def cmd_resync(args: argparse.Namespace) -> int:
    cv = _read_cluster(args)
    nodes = _pick(node_accesses(args, cv), args.node_name)
    [acc] = nodes.values()
    try:
        doc = acc.query(args.daemon, request="resync")
    except NodeUnreachable as e:
        raise CLIError(str(e)) from None
    if args.output == "json":
        render.dump_json(doc)
    else:
        asked = ", ".join(doc.get("resync", [])) or "no component"
        print(f"{acc.name}: {args.daemon} daemon repairing now ({asked})")
    return 0


# ------------------------------------------------------------ ipam


def cmd_ipam(args: argparse.Namespace) -> int:
    cv = _read_cluster(args)
    if args.release:
        return _cmd_release(args, cv)
    nodes = _pick(node_accesses(args, cv), args.node)
    dumps = collect(nodes, ("node",))
    leaks = [f for f in check.check_ipam(cv, dumps)]
    pools = []
    for name in sorted(nodes):
        lease = cv.lease_of(name)
        if lease is None:
            continue
        import ipaddress

        net = ipaddress.ip_network(lease.subnet)
        allocs = [a for a in cv.allocations if ipaddress.ip_address(a.ip) in net]
        size = net.num_addresses - 3  # network, gateway, broadcast
        pods = {p.status.pod_ip: p for p in cv.pods if p.status.pod_ip}
        pools.append(
            {
                "node": name,
                "subnet": lease.subnet,
                "size": size,
                "allocated": len(allocs),
                "allocations": [
                    {
                        "ip": a.ip,
                        "pod": f"{a.alloc.pod_namespace}/{a.alloc.pod_name}"
                        if a.alloc.pod_name
                        else None,
                        "podNow": f"{pods[a.ip].namespace}/{pods[a.ip].name}"
                        if a.ip in pods
                        else None,
                        "container": a.alloc.container_id,
                        "createdAt": a.alloc.created_at,
                    }
                    for a in sorted(allocs, key=lambda a: ipaddress.ip_address(a.ip))
                ],
            }
        )
    if args.output == "json":
        render.dump_json({"pools": pools, "problems": [f.as_dict() for f in leaks]})
        return 1 if leaks else 0
    out = render.Out()
    for p in pools:
        pct = 100 * p["allocated"] / p["size"] if p["size"] else 0
        out.line(
            out.c(f"{p['node']}  {p['subnet']}", "bold")
            + f"  {p['allocated']}/{p['size']} used ({pct:.1f}%)"
        )
        for a in p["allocations"]:
            owner = a["pod"] or a["container"][:12]
            out.line(f"  {a['ip']:<15} {owner:<40} {a['createdAt'] or ''}")
    for f in leaks:
        out.line(out.c("✗ ", "red") + f"{f.node or 'cluster'}: {f.what}")
        if f.fix:
            out.line("    fix: " + out.c(f.fix, "bold"))
    return 1 if leaks else 0


def _cmd_release(args: argparse.Namespace, cv: model.ClusterView) -> int:
    found = [a for a in cv.allocations if a.ip == args.release]
    if not found:
        raise CLIError(f"--release {args.release}: no allocation of that IP in etcd")
    if cv.pod_by_ip(args.release) is not None:
        p = cv.pod_by_ip(args.release)
        raise CLIError(f"--release {args.release}: pod {p.namespace}/{p.name} has it; not a leak")
    node = found[0].alloc.node_name
    nodes = node_accesses(args, cv)
    if node in nodes:
        d = collect({node: nodes[node]}, ("node",))[node]
        if d.node is None:
            raise CLIError(
                f"--release {args.release}: cannot see {node}'s sandboxes ({d.node_error}); "
                "refusing to free an IP that may be in use"
            )
        if args.release in check.pod_veths(d.node):
            raise CLIError(f"--release {args.release}: a veth on {node} still carries it")

    async def go() -> list[str]:
        async with store_from_args(args) as store:
            return [await release(store, a.key) for a in found]

    for line in run(go):
        print(line)
    return 0


# ------------------------------------------------------------ services


def cmd_services(args: argparse.Namespace) -> int:
    cv = _read_cluster(args)
    nodes = _pick(node_accesses(args, cv), args.node)
    dumps = collect(nodes, ("proxy",))
    want = {}
    for key, v in cv.views().items():
        from corral.proxy.core import usable

        for sp in v.ports:
            want[(sp.cluster_ip, sp.port, sp.protocol)] = (
                key,
                sorted(f"{e.ip}:{e.port}" for e in usable(v.endpoints_of(sp))),
            )
    doc: dict[str, Any] = {}
    for name, d in sorted(dumps.items()):
        if d.proxy is None:
            doc[name] = {"error": d.proxy_error}
            continue
        ex = explain.explainer(d.proxy)
        table = ex.table(explain.proxy_state(d.proxy))
        seen = set()
        rows = []
        for e in table:
            k = (e.vip, e.port, e.protocol)
            seen.add(k)
            etcd = want.get(k)
            disagree = None
            if etcd is None:
                disagree = "not in etcd (stale)"
            elif sorted(e.backends) != etcd[1]:
                disagree = f"etcd has {', '.join(etcd[1]) or 'no endpoints'}"
            rows.append(e.as_dict() | {"disagrees": disagree})
        for k, (key, eps) in sorted(want.items()):
            if k not in seen:
                rows.append(
                    {
                        "vip": k[0],
                        "port": k[1],
                        "protocol": k[2],
                        "name": key,
                        "backends": [],
                        "disagrees": "missing on this node "
                        f"(etcd: {', '.join(eps) or 'no endpoints'})",
                    }
                )
        doc[name] = {"mode": ex.mode, "services": rows}
    if args.output == "json":
        render.dump_json(doc)
    else:
        out = render.Out()
        for name, d in doc.items():
            out.line(
                out.c(f"{name}", "bold") + (f"  ({d.get('mode')} mode)" if "mode" in d else "")
            )
            if "error" in d:
                out.line("  " + out.c(d["error"], "red"))
                continue
            for r in d["services"]:
                backends = ", ".join(r["backends"]) or ("REJECT" if r.get("reject") else "-")
                out.line(
                    f"  {r['vip']}:{r['port']}/{r['protocol']:<4} {r['name']:<28} -> {backends}"
                )
                for a in r.get("affinity") or []:
                    out.line(
                        f"      affinity {a['client']} -> {a['backend']} "
                        f"(age {a['age']}s, forgotten in {a['left']}s)"
                    )
                if r.get("disagrees"):
                    out.line("      " + out.c("disagrees with etcd: " + r["disagrees"], "red"))
    bad = any(
        "error" in d or any(r.get("disagrees") for r in d.get("services", [])) for d in doc.values()
    )
    return 1 if bad else 0


def cmd_policy(args: argparse.Namespace) -> int:
    from corral.netdebug import policy

    cv = _read_cluster(args)
    target = args.pod if "/" in args.pod else f"{args.namespace or 'default'}/{args.pod}"
    pod = cv.pod(target)
    node_dump = None
    if pod is not None and pod.spec.node_name:
        nodes = node_accesses(args, cv)
        if pod.spec.node_name in nodes:
            dumps = collect({pod.spec.node_name: nodes[pod.spec.node_name]}, ("node",))
            d = dumps[pod.spec.node_name]
            node_dump = check._component(d.node, "netpolicy") if d.node else None
    try:
        doc = policy.effective(cv, target, node_dump or None)
    except policy.PolicyError as e:
        raise CLIError(str(e)) from None
    if args.output == "json":
        render.dump_json(doc)
    else:
        policy.print_effective(doc, render.Out())
    return 0 if doc.get("node_agrees", True) else 1


# ------------------------------------------------------------ trace and capture


def cmd_trace(args: argparse.Namespace) -> int:
    from corral.netdebug import trace

    cv = _read_cluster(args)
    nodes = node_accesses(args, cv)
    try:
        result = trace.trace(
            cv,
            nodes,
            args.source,
            args.target,
            probe=not args.no_probe,
            timeout=args.timeout,
            collect=collect,
        )
    except trace.TraceError as e:
        raise CLIError(str(e)) from None
    if args.output == "json":
        render.dump_json(result.as_dict())
    else:
        trace.print_result(result, render.Out())
    return 0 if result.ok else 1


def cmd_capture(args: argparse.Namespace) -> int:
    from corral.netdebug import capture

    if not args.node:
        raise CLIError("capture: --node N is required (the node whose interfaces to watch)")
    cv = _read_cluster(args)
    nodes = _pick(node_accesses(args, cv), args.node)
    [acc] = nodes.values()
    try:
        return capture.run(cv, acc, args, collect)
    except capture.CaptureError as e:
        raise CLIError(str(e)) from None
