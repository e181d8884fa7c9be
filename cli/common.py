"""What every CLI verb shares: errors for users, finding etcd, a connected store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from corral.api.store import Store, Unavailable, parse_endpoints

DEFAULT_ETCD = "http://127.0.0.1:2379"


class CLIError(Exception):
    """A user mistake or an unmet precondition: printed without a traceback, exit 1."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def local_cluster_urls(name: str | None = None) -> list[str] | None:
    """The etcd endpoints of the local cluster `corral up` made, if there is one."""
    try:
        from corral.cluster.local import local_etcd_urls
    except ImportError:  # pragma: no cover - only while the cluster module is absent
        return None
    try:
        return local_etcd_urls(name or os.environ.get("CORRAL_CLUSTER", "corral"))
    except (OSError, ValueError):
        return None


def etcd_endpoints(args: argparse.Namespace) -> list[str]:
    """--etcd, else $CORRAL_ETCD, else the local cluster's etcd, else the default."""
    raw = getattr(args, "etcd", None) or os.environ.get("CORRAL_ETCD")
    if raw:
        urls = [u for u in raw.split(",") if u.strip()]
    else:
        urls = local_cluster_urls(getattr(args, "cluster", None)) or [DEFAULT_ETCD]
    try:
        parse_endpoints(urls)
    except ValueError as e:
        raise CLIError(f"--etcd: {e}") from None
    return urls


@contextlib.asynccontextmanager
async def store_from_args(args: argparse.Namespace) -> AsyncIterator[Store]:
    urls = etcd_endpoints(args)
    store = Store(urls, timeout=float(getattr(args, "etcd_timeout", 5.0) or 5.0))
    try:
        await store.connect()
    except Unavailable as e:
        raise CLIError(
            f"{e}.\n  Is a cluster running? Start a local one with `corral up`, or point "
            "corral at yours with --etcd URL (or CORRAL_ETCD)."
        ) from None
    try:
        yield store
    finally:
        await store.close()


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run one async CLI action; turn a lost etcd into a CLIError."""

    async def wrapped() -> Any:
        try:
            return await coro_fn()
        except Unavailable as e:
            raise CLIError(f"{e}; is etcd running?") from None

    return asyncio.run(wrapped())


def add_command_argument(p: argparse.ArgumentParser, metavar: str = "CMD") -> None:
    """A verb that runs a command: its words land in args.cmd, with everything after
    `--` (which corral's own flag parsing never sees; see corral.cli.main.parse)."""
    p.add_argument("cmd", nargs="*", metavar=f"-- {metavar}", help="the command and its arguments")
    p.set_defaults(takes_command=True)


def add_etcd_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="etcd endpoints (default: $CORRAL_ETCD, else the local cluster's)",
    )
