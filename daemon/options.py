"""The flags every daemon takes, its default port, and where it listens by default.

| daemon      | port  |
|-------------|-------|
| node        | 10271 |
| scheduler   | 10272 |
| controllers | 10273 |
| proxy       | 10274 |
| dns         | 10275 |
| apiserver   | 10276 |

One HTTP server per daemon serves `/metrics`, `/healthz` and `/readyz`. The node
daemon listens on its own underlay (InternalIP) address, the others on
127.0.0.1 unless `--metrics-addr` says otherwise; never 0.0.0.0 by default.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

PORTS: dict[str, int] = {
    "node": 10271,
    "scheduler": 10272,
    "controllers": 10273,
    "proxy": 10274,
    "dns": 10275,
    "apiserver": 10276,
}

OFF = ("0", "off", "none", "")


def parse_addr(text: str, default_host: str | None, default_port: int) -> tuple[str, int] | None:
    """`HOST:PORT`, `HOST`, `:PORT` or `PORT` -> (host, port); `0`/`off` -> None (disabled).

    A missing host is `default_host` (None: decided later, e.g. the node's own address).
    """
    t = text.strip()
    if t.lower() in OFF:
        return None
    host: str | None
    if t.isdigit():
        host, port_s = default_host, t
    elif t.startswith("["):
        raise ValueError(f"{text!r}: IPv6 addresses are not supported yet; give an IPv4 HOST:PORT")
    elif ":" in t:
        host, _, port_s = t.rpartition(":")
        host = host or default_host
    else:
        host, port_s = t, str(default_port)
    try:
        port = int(port_s)
    except ValueError:
        msg = f"{text!r}: the port must be a number, as in 127.0.0.1:{default_port}"
        raise ValueError(msg) from None
    if not 0 < port < 65536:
        raise ValueError(f"{text!r}: the port must be 1-65535 (or 'off' to disable)")
    if host is not None:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: HOST must be an IPv4 address, as in 127.0.0.1") from None
    return (host or "", port)


def add_daemon_options(p: argparse.ArgumentParser, daemon: str) -> None:
    port = PORTS[daemon]
    where = "this node's underlay (InternalIP) address" if daemon == "node" else "127.0.0.1"
    sock = "<run dir>/debug.sock" if daemon == "node" else f"/run/corral/{daemon}-debug.sock"
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        default=None,
        help=f"where to serve /metrics, /healthz and /readyz (default: {where}:{port}; "
        "'off' or 0 disables)",
    )
    p.add_argument(
        "--debug-socket",
        metavar="PATH",
        default=None,
        help="root-only unix socket answering the daemon's state as JSON "
        f"(default: {sock}; 'off' disables)",
    )


def http_addr(args: Any, daemon: str, default_host: str | None) -> tuple[str, int] | None:
    """The (host, port) to serve on from `--metrics-addr`, or None when disabled.

    An empty host means "the default host", which the node fills in once it
    knows its underlay address.
    """
    raw = getattr(args, "metrics_addr", None)
    if raw is None:
        return (default_host or "", PORTS[daemon])
    return parse_addr(raw, default_host, PORTS[daemon])


def debug_socket(args: Any, default: str) -> str | None:
    raw = getattr(args, "debug_socket", None)
    if raw is None:
        return default
    return None if raw.strip().lower() in OFF else raw
