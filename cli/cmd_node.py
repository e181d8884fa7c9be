"""`corral node`: run the node agent (overlay, CNI server, pod runtime)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
from typing import Any

from corral.cli.common import CLIError, new_store
from corral.daemon import options
from corral.nodeagent.agent import COMPONENTS, NodeSetupError, serve
from corral.nodeagent.context import node_context


def register(sub: Any) -> None:
    p = sub.add_parser("node", help="run the node agent on this machine (a daemon)")
    p.add_argument("--name", default=None, help="node name (default: this machine's hostname)")
    p.add_argument(
        "--underlay-iface",
        default=None,
        help="interface carrying node-to-node traffic (default: the default route's)",
    )
    p.add_argument(
        "--underlay-ip",
        default=None,
        help="this node's address on the underlay (default: --underlay-iface's IPv4 address)",
    )
    p.add_argument(
        "--components",
        default=",".join(COMPONENTS),
        help=f"which parts to run, comma-separated (default: {','.join(COMPONENTS)})",
    )
    p.add_argument(
        "--state-dir",
        default="/var/lib/corral/node",
        help="where the node keeps what must survive restarts",
    )
    p.add_argument("--run-dir", default="/run/corral")
    p.add_argument("--cni-conf-dir", default="/etc/cni/net.d")
    p.add_argument("--cni-bin-dir", default="/opt/cni/bin")
    p.add_argument("--cni-cache-dir", default="/var/lib/cni")
    p.add_argument(
        "--netns-dir", default="/run/netns", help="where pod network namespaces are pinned"
    )
    p.add_argument(
        "--pod-credentials-dir",
        dest="credentials_dir",
        default="/etc/corral/pod-credentials",
        metavar="DIR",
        help="credential sets (one subdirectory each) that pods in corral-system may ask "
        "for with the annotation corral.dev/credentials: NAME; mounted read-only at "
        "/run/secrets/corral/NAME, hidden from every other pod",
    )
    p.add_argument(
        "--cni-shim",
        choices=("native", "python"),
        default="native",
        help="the CNI binaries to install: a small C forwarder built here with cc "
        "(default; falls back to python when it cannot be built) or the "
        "stdlib-only Python script",
    )
    p.add_argument(
        "--datapath",
        choices=("auto", "bpf", "kernel"),
        default=os.environ.get("CORRAL_DATAPATH", "auto"),
        help="pod traffic between nodes: the eBPF fast path when BCC can load it, "
        "else the kernel's path (auto, default); the fast path or fail (bpf); "
        "the kernel's path only (kernel). Default from CORRAL_DATAPATH, "
        "which `corral up` passes on to its nodes",
    )
    p.add_argument(
        "--resync-interval",
        type=float,
        default=float(os.environ.get("CORRAL_NODE_RESYNC") or 10.0),
        metavar="SECONDS",
        help="a full overlay repair pass at least this often (default 10, or "
        "$CORRAL_NODE_RESYNC); `corral net check --fix` asks for one at once",
    )
    p.add_argument(
        "--kernel-events",
        choices=("on", "off"),
        default=os.environ.get("CORRAL_NODE_KERNEL_EVENTS") or "on",
        help="repair as soon as netlink reports a deleted route, neighbour, FDB entry or "
        "a changed device (default on, or $CORRAL_NODE_KERNEL_EVENTS); off leaves drift "
        "for the periodic pass, so it can be looked at (`corral net check`)",
    )
    p.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="first delay before a failed container is restarted, doubling up to 5 minutes "
        "(default 10)",
    )
    p.add_argument(
        "--netns",
        metavar="NAME",
        help="do the kernel work in this network namespace (a name or path) while talking "
        "to etcd from this one (tests, debugging)",
    )
    p.add_argument("--lease-ttl", type=int, default=30, metavar="SECONDS", help="subnet lease TTL")
    # kubelet's flag names: the node API the API server reaches for logs and exec
    p.add_argument(
        "--tls-cert-file",
        metavar="FILE",
        help="the node API's serving certificate (with --tls-private-key-file and "
        "--client-ca-file; without them the node API is off and `kubectl logs`/`exec` "
        "cannot reach this node's pods)",
    )
    p.add_argument("--tls-private-key-file", metavar="FILE", help="its private key")
    p.add_argument(
        "--client-ca-file",
        metavar="FILE",
        help="the CA that signed the API server's client certificate",
    )
    p.add_argument(
        "--port",
        dest="node_api_port",
        type=int,
        default=10250,
        metavar="PORT",
        help="the node API's port on the node's address (default 10250, kubelet's)",
    )
    options.add_daemon_options(p, "node")
    p.set_defaults(func=cmd_node, daemon=True)
    from corral.cli.cmd_network import add_node_remove  # `corral node remove NAME`

    add_node_remove(p)


def cmd_node(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CLIError("corral node manages network interfaces and must run as root")
    name = args.name or os.uname().nodename
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 63:
        raise CLIError(
            f"--name {name!r}: a node name must be a DNS name (lowercase letters, "
            "digits, '-' and '.')"
        )
    if args.resync_interval <= 0:
        raise CLIError("--resync-interval must be more than 0 seconds")
    if args.restart_backoff <= 0:
        raise CLIError("--restart-backoff must be more than 0 seconds")
    if args.underlay_ip is not None:
        try:
            ipaddress.IPv4Address(args.underlay_ip)
        except ValueError:
            raise CLIError(f"--underlay-ip {args.underlay_ip!r}: give an IPv4 address") from None
    comps = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in comps if c not in COMPONENTS]
    if unknown:
        raise CLIError(
            f"--components: unknown {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}"
        )
    try:
        addr = options.http_addr(args, "node", None)  # no host: the underlay address
    except ValueError as e:
        raise CLIError(f"--metrics-addr {e}") from None
    debug = options.debug_socket(args, "")  # "": <run dir>/debug.sock
    from corral.api.netconfig import ConfigError
    from corral.ebpf.loader import BPFUnavailable  # imported here: it loads pyroute2

    ctx = node_context(name, new_store(args), args)  # each flag sets the field it names
    try:
        asyncio.run(serve(ctx, comps, http_addr=addr, debug_socket=debug))
    except (NodeSetupError, ConfigError, BPFUnavailable) as e:
        raise CLIError(str(e)) from None
    return 0
