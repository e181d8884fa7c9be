"""`corral scheduler` and `corral controllers`: the control-plane daemons."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from corral.cli.common import CLIError, new_store
from corral.control.manager import (
    CONTROLLERS,
    ControllerOptions,
    serve_controllers,
    serve_scheduler,
)
from corral.daemon import options, privileges


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return v


def register(sub: Any) -> None:
    p = sub.add_parser("scheduler", help="run the scheduler: bind pending pods to nodes (a daemon)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for breaking ties between equally good nodes (repeatable runs)",
    )
    options.add_daemon_options(p, "scheduler")
    p.set_defaults(func=cmd_scheduler, daemon=True)

    p = sub.add_parser(
        "controllers",
        help="run the replication, endpoints, service-IP, node-lifecycle, namespace and "
        "LoadBalancer-address controllers (a daemon)",
    )
    p.add_argument(
        "--controllers",
        default=",".join(CONTROLLERS),
        help=f"which to run, comma-separated (default: {','.join(CONTROLLERS)})",
    )
    p.add_argument(
        "--node-monitor-grace",
        type=_positive,
        default=40.0,
        metavar="SECONDS",
        help="a node silent this long is marked Ready=Unknown (default 40)",
    )
    p.add_argument(
        "--pod-eviction-timeout",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="pods of a node not ready this long are deleted and recreated elsewhere (default 60)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for address allocation")
    options.add_daemon_options(p, "controllers")
    p.set_defaults(func=cmd_controllers, daemon=True)


def cmd_scheduler(args: argparse.Namespace) -> int:
    store, addr, debug = _daemon(args, "scheduler")
    asyncio.run(serve_scheduler(store, seed=args.seed, http_addr=addr, debug_socket=debug))
    return 0


def cmd_controllers(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.controllers.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTROLLERS]
    if unknown or not names:
        raise CLIError(
            f"--controllers: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(CONTROLLERS)}"
        )
    opts = ControllerOptions(
        node_monitor_grace=args.node_monitor_grace,
        pod_eviction_timeout=args.pod_eviction_timeout,
        seed=args.seed,
    )
    store, addr, debug = _daemon(args, "controllers")
    asyncio.run(serve_controllers(store, names, opts, http_addr=addr, debug_socket=debug))
    return 0


def _daemon(args: argparse.Namespace, name: str) -> tuple[Any, tuple[str, int] | None, str | None]:
    """The store, metrics address and debug socket of a control-plane daemon, its
    capabilities dropped (it only talks to etcd). It waits for etcd rather than failing."""
    try:
        addr = options.http_addr(args, name, "127.0.0.1")
    except ValueError as e:
        raise CLIError(f"--metrics-addr {e}") from None
    debug = options.debug_socket(args, f"/run/corral/{name}-debug.sock")
    store = new_store(args)
    privileges.apply(name)  # before any thread exists: they inherit what we keep
    return store, addr, debug
