"""`corral proxy`: the service proxy daemon (`--mode`, proxy/mode.py), and `--cleanup`."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from corral.cli.common import CLIError, new_store
from corral.daemon import options, privileges
from corral.proxy import mode as modes

DEFAULT_MODE_ENV = "CORRAL_PROXY_MODE"


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return v


def register(sub: Any) -> None:
    p = sub.add_parser(
        "proxy", help="run the service proxy on this node: service VIPs and NodePorts (a daemon)"
    )
    p.add_argument(
        "--mode",
        choices=modes.names(),
        default=os.environ.get(DEFAULT_MODE_ENV) or "iptables",
        help="how services are programmed: iptables (default), ebpf (pods' connections "
        "translated at connect() by BPF programs on the node's cgroup; NodePort and the "
        "node's own traffic keep iptables rules), nftables (one table of the node's own, "
        "verdict maps, one libnftables transaction per sync), auto (ebpf when it can load "
        f"here, else nftables, else iptables, saying why). Default from ${DEFAULT_MODE_ENV}, "
        "which `corral up --proxy-mode` sets for its nodes",
    )
    p.add_argument(
        "--node", default=None, help="this node's name (default: $CORRAL_NODE, else the hostname)"
    )
    p.add_argument(
        "--min-sync-period",
        type=_seconds,
        default=0.1,
        metavar="SECONDS",
        help="at least this long between two syncs: bursts coalesce (default 0.1)",
    )
    p.add_argument(
        "--sync-period",
        type=_seconds,
        default=os.environ.get("CORRAL_PROXY_SYNC_PERIOD") or 30.0,
        metavar="SECONDS",
        help="a full sync (every rule rewritten, stale ones removed) at least this often "
        "(default 30, or $CORRAL_PROXY_SYNC_PERIOD)",
    )
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove every chain, rule, ipset, route, fast-path map entry, eBPF program and "
        "pinned map the proxy made (whichever mode made them), then exit",
    )
    p.add_argument(
        "--service-cidr",
        default="10.96.0.0/12",
        help="with --cleanup: the service CIDR whose route the proxy added (default 10.96.0.0/12)",
    )
    options.add_daemon_options(p, "proxy")
    p.set_defaults(func=cmd_proxy, daemon=True)


def cmd_proxy(args: argparse.Namespace) -> int:
    from corral.proxy import component
    from corral.proxy.serve import serve

    if os.geteuid() != 0:
        raise CLIError("corral proxy programs netfilter and must run as root")
    node = args.node or os.environ.get("CORRAL_NODE") or os.uname().nodename
    if args.cleanup:
        for line in component.cleanup(node, args.service_cidr):
            print(f"removed {line}")
        return 0
    try:
        mode, why = modes.resolve(args.mode)
    except modes.ModeUnavailable as e:
        raise CLIError(str(e)) from None
    if args.min_sync_period > args.sync_period or args.sync_period <= 0:
        raise CLIError("--min-sync-period must not exceed --sync-period, which must be > 0")
    try:
        addr = options.http_addr(args, "proxy", "127.0.0.1")
    except ValueError as e:
        raise CLIError(f"--metrics-addr {e}") from None
    debug = options.debug_socket(args, "/run/corral/proxy-debug.sock")
    store = new_store(args)
    # a node switched from another mode keeps nothing of it (before privileges go)
    for line in modes.remove_other_modes(mode, node):
        print(f"{line} removed (left by another proxy mode)", flush=True)
    # before any thread exists: they inherit what we keep
    privileges.apply(mode.privileges)
    asyncio.run(
        serve(
            store,
            node,
            mode=mode.name,
            fallback=args.mode == "auto",
            mode_note=why,
            min_sync_period=args.min_sync_period,
            sync_period=args.sync_period,
            http_addr=addr,
            debug_socket=debug,
        )
    )
    return 0
