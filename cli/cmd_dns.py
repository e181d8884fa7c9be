"""`corral dns`: the cluster DNS server (a daemon; see docs/dns.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
from typing import Any

from corral.cli.common import CLIError, new_store
from corral.daemon import options, privileges

_ZONE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dns",
        help="run the cluster DNS server: the cluster zone from etcd, everything else "
        "forwarded (a daemon)",
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDR[:PORT]",
        help="where to answer, over UDP and TCP (repeatable; default 0.0.0.0:53)",
    )
    p.add_argument(
        "--zone",
        default=None,
        help="the cluster zone (default: NetworkConfig's clusterDomain, else cluster.local)",
    )
    p.add_argument(
        "--ttl", type=int, default=5, metavar="SECONDS", help="TTL of cluster records (default 5)"
    )
    p.add_argument(
        "--upstream",
        action="append",
        metavar="IP[:PORT]",
        help="resolver for names outside the zone (repeatable; default: the nameservers "
        "of --resolv-conf)",
    )
    p.add_argument(
        "--resolv-conf",
        default="/etc/resolv.conf",
        metavar="PATH",
        help="where the default upstreams come from (default /etc/resolv.conf)",
    )
    p.add_argument(
        "--pods",
        choices=("disabled", "insecure", "verified"),
        default="insecure",
        help="pod records a-b-c-d.<ns>.pod.<zone>: none, any such name (default, as "
        "kubeadm's CoreDNS), or only for a pod that has that IP in that namespace",
    )
    p.add_argument(
        "--forward-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long to wait for one upstream before trying the next (default 2)",
    )
    p.add_argument(
        "--cache-size",
        type=int,
        default=1000,
        metavar="N",
        help="forwarded answers kept (default 1000; 0 disables the cache)",
    )
    p.add_argument(
        "--node", default=None, help="this node's name (default: $CORRAL_NODE, else the hostname)"
    )
    options.add_daemon_options(p, "dns")
    p.set_defaults(func=cmd_dns, daemon=True)


def _addr(text: str, flag: str, default_host: str | None) -> tuple[str, int]:
    try:
        addr = options.parse_addr(text, default_host, 53)
    except ValueError as e:
        raise CLIError(f"{flag} {e}") from None
    if addr is None or not addr[0]:
        raise CLIError(f"{flag} {text!r}: give an IPv4 address, as in 10.96.0.10:53")
    return addr


def config_from(args: argparse.Namespace) -> Any:
    from corral.clusterdns.forward import read_resolv_conf
    from corral.clusterdns.server import Config

    listen = [_addr(t, "--listen", "0.0.0.0") for t in (args.listen or ["0.0.0.0:53"])]
    if args.zone is not None:
        zone = args.zone.strip().rstrip(".").lower()
        if len(zone) > 253 or not _ZONE.match(zone):
            raise CLIError(f"--zone {args.zone!r} is not a DNS name (as in cluster.local)")
    else:
        zone = None
    if not 0 <= args.ttl <= 86400:
        raise CLIError(f"--ttl {args.ttl}: give 0-86400 seconds")
    if args.forward_timeout <= 0:
        raise CLIError("--forward-timeout must be more than 0 seconds")
    if args.cache_size < 0:
        raise CLIError("--cache-size must not be negative")
    if args.upstream:
        ups = [_addr(t, "--upstream", None) for t in args.upstream]
    else:
        ups = read_resolv_conf(args.resolv_conf)
    return Config(
        listen=listen,
        zone=zone,
        ttl=args.ttl,
        upstreams=ups,
        pods=args.pods,
        forward_timeout=args.forward_timeout,
        cache_size=args.cache_size,
    )


def cmd_dns(args: argparse.Namespace) -> int:
    config = config_from(args)
    node = args.node or os.environ.get("CORRAL_NODE") or os.uname().nodename
    try:
        addr = options.http_addr(args, "dns", "127.0.0.1")
    except ValueError as e:
        raise CLIError(f"--metrics-addr {e}") from None
    debug = options.debug_socket(args, "/run/corral/dns-debug.sock")
    store = new_store(args)
    privileges.apply("dns")  # before any thread exists: they inherit what we keep
    from corral.clusterdns.serve import serve

    try:
        asyncio.run(serve(store, node, config, http_addr=addr, debug_socket=debug))
    except RuntimeError as e:
        if str(e).startswith("cannot listen"):
            raise CLIError(str(e)) from None
        raise
    return 0
