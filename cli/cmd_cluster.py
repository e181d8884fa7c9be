"""`corral up`, `down`, `status`, `node-exec`: the local multi-node cluster."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from corral.cli.common import CLIError, add_command_argument, etcd_tls
from corral.cluster import down, health, local, plan, up
from corral.cluster.state import DEFAULT_NAME

T = TypeVar("T")


def _name_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name",
        default=os.environ.get("CORRAL_CLUSTER") or DEFAULT_NAME,
        help=f"cluster name (default: $CORRAL_CLUSTER, else {DEFAULT_NAME})",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        help="where the cluster's state lives (default: /var/lib/corral/<name>, "
        "root overridden by $CORRAL_STATE_DIR)",
    )


def _cluster_call(fn: Callable[..., T], *args: Any) -> T:
    """Call into corral.cluster, turning its user-facing errors into CLI errors."""
    try:
        return fn(*args)
    except local.ClusterError as e:
        raise CLIError(str(e)) from None


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start (or converge) a local multi-node cluster")
    p.add_argument(
        "--nodes",
        type=int,
        default=None,
        help=f"number of nodes, 1-{plan.MAX_NODES} (default: {plan.DEFAULT_NODES}, "
        "or the running cluster's)",
    )
    p.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        default=argparse.SUPPRESS,
        help="use this etcd instead of starting a local one",
    )
    p.add_argument(
        "--etcd-members",
        type=int,
        default=None,
        metavar="N",
        help="members of the local etcd: 1 (default) or 3 (survives losing one)",
    )
    p.add_argument(
        "--underlay-cidr",
        default=None,
        help=f"addresses of the nodes' network (default: {plan.DEFAULT_UNDERLAY})",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for every node to be Ready (default: 60; 0: do not wait)",
    )
    p.add_argument(
        "--proxy-mode",
        choices=("iptables", "ebpf", "nftables", "auto"),
        default=None,
        help="the service proxy's mode on every node (default: $CORRAL_PROXY_MODE, else "
        "iptables); passed on to the nodes as CORRAL_PROXY_MODE",
    )
    p.add_argument(
        "--lb-pool",
        default=None,
        metavar="CIDR",
        help="addresses for type LoadBalancer Services, inside the underlay network (e.g. "
        "its top /28): a LoadBalancerPool; one node answers ARP for each address",
    )
    p.add_argument(
        "--etcd-auth",
        action="store_true",
        help="turn on the local etcd's users and roles, so the cluster DNS pods' "
        "certificate may only read (costs etcd ~25%% more CPU per write; kept on)",
    )
    p.add_argument(
        "--dns-replicas",
        type=int,
        default=None,
        metavar="N",
        help="cluster DNS pods (`corral dns` behind the Service corral-system/dns at the "
        "cluster DNS address; default 2, or the running count; 0: none)",
    )
    p.add_argument(
        "--apiservers",
        type=int,
        default=None,
        metavar="N",
        help="API servers, one on each of nodes 1..N behind the `kubernetes` Service "
        "(default 1, or the running count); the kubeconfig names node-1's",
    )
    _name_options(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop and remove a local cluster and everything it made")
    _name_options(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="health of a local cluster: etcd, nodes, daemons")
    _name_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "kubeconfig", help="print the local cluster's kubeconfig (the API server's admin)"
    )
    _name_options(p)
    p.set_defaults(func=cmd_kubeconfig)

    p = sub.add_parser(
        "node-exec",
        help="run a command on a node of the local cluster",
        usage="corral node-exec [--name CLUSTER] NODE -- COMMAND [ARGS...]",
    )
    _name_options(p)
    p.add_argument("node", metavar="NODE", help="node name (e.g. node-1) or number")
    add_command_argument(p, "COMMAND [ARGS]")
    p.set_defaults(func=cmd_node_exec)


def _urls(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        raise CLIError("--etcd is empty; give URLs like http://127.0.0.1:2379")
    return urls


def cmd_up(args: argparse.Namespace) -> int:
    if args.wait < 0:
        raise CLIError("--wait must be 0 or more seconds")
    if args.proxy_mode:
        os.environ["CORRAL_PROXY_MODE"] = args.proxy_mode  # reaches the nodes' daemons
    opts = plan.UpOptions(
        name=args.name,
        nodes=args.nodes,
        etcd=_urls(getattr(args, "etcd", None)),
        etcd_tls=etcd_tls(args) if getattr(args, "etcd", None) else None,
        etcd_members=args.etcd_members,
        underlay_cidr=args.underlay_cidr,
        state_dir=args.state_dir,
        wait=args.wait,
        dns_replicas=args.dns_replicas,
        etcd_auth=args.etcd_auth,
        apiservers=args.apiservers,
        lb_pool=args.lb_pool,
    )
    s = _cluster_call(up.up, opts)
    print(up.summary(s))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    found = _cluster_call(down.down, args.name, args.state_dir)
    print(f"Cluster {args.name!r} removed." if found else f"No cluster {args.name!r} to remove.")
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from corral.cluster import kubeconfig

    s = local.load_state(args.name, args.state_dir)
    if s is None:
        raise CLIError(f"no cluster {args.name!r}; start one with `corral up --name {args.name}`")
    try:
        with open(kubeconfig.path(s)) as f:
            sys.stdout.write(f.read())
    except FileNotFoundError:
        raise CLIError(
            f"cluster {args.name!r} has no kubeconfig yet; `corral up --name {args.name}` writes it"
        ) from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    h = _cluster_call(health.status, args.name, args.state_dir)
    mark = {True: "ok", False: "DOWN"}
    etcd = mark[h.etcd_ok] + ("" if h.etcd_ok else f" ({h.etcd_error})")
    relay = "" if h.relay is None else f", relay into the nodes {mark[h.relay]}"
    print(f"cluster {h.name}: etcd {','.join(h.etcd_urls)} {etcd}{relay}")
    if h.etcd_members:
        healthy = sum(h.etcd_members.values())
        each = " ".join(f"{k}={mark[v]}" for k, v in h.etcd_members.items())
        print(f"etcd members: {healthy} of {len(h.etcd_members)} healthy ({each})")
    print(f"{'NODE':<20} {'IP':<15} {'NETNS':<6} {'HOLDER':<7} {'READY':<8} DAEMONS")
    problems = []
    for n in h.nodes:
        shown = []
        for k, alive in sorted(n.daemons.items()):
            why = n.healthz.get(k, "ok" if alive else "")
            shown.append(f"{k}={'DOWN' if not alive else 'ok' if why == 'ok' else 'UNHEALTHY'}")
            if alive and why != "ok":
                problems.append(f"  {k} on {n.name}: {why}")
        ds = " ".join(shown) or "-"
        print(f"{n.name:<20} {n.ip:<15} {mark[n.netns]:<6} {mark[n.holder]:<7} {n.ready:<8} {ds}")
    for line in problems:
        print(line)
    if h.dns is not None:
        note = "" if h.dns.ok else "  <- degraded" if h.dns.answering else "  <- DOWN"
        print(h.dns.line() + note)
    if not h.ok:
        print(
            "Something is down or unhealthy; `corral up"
            f"{'' if h.name == DEFAULT_NAME else ' --name ' + h.name}` restarts what is "
            "missing, the failing health checks are listed above, logs are in the state "
            "dir's logs/.",
            file=sys.stderr,
        )
    return 0 if h.ok else 1


def cmd_node_exec(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    _cluster_call(local.require_root)
    argv = _cluster_call(local.node_exec_argv, args.name, args.node, cmd, args.state_dir)
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 130
