"""What every CLI verb shares: errors for users, finding etcd, a connected store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from corral.api.namespaces import NamespaceError, check_namespaces
from corral.api.objects import TypedObject
from corral.api.store import Store, TLSFiles, Unavailable, parse_endpoints

DEFAULT_ETCD = "http://127.0.0.1:2379"


class CLIError(Exception):
    """A user mistake or an unmet precondition: printed without a traceback, exit 1."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


TLS_FLAGS = (("cafile", "ca"), ("certfile", "cert"), ("keyfile", "key"))


def local_cluster(name: str | None = None) -> tuple[list[str], TLSFiles | None] | None:
    """The etcd endpoints of the local cluster `corral up` made, and the operator's
    certificate for them, if there is one."""
    try:
        from corral.cluster.local import local_etcd
    except ImportError:  # pragma: no cover - only while the cluster module is absent
        return None
    try:
        return local_etcd(name or os.environ.get("CORRAL_CLUSTER", "corral"))
    except (OSError, ValueError):
        return None


def local_kubeconfig(name: str | None = None) -> str | None:
    """The kubeconfig `corral up` wrote for the local cluster `name`, if there is one."""
    try:
        from corral.cluster import kubeconfig
        from corral.cluster.local import load_state
    except ImportError:  # pragma: no cover - only while the cluster module is absent
        return None
    s = load_state(name or os.environ.get("CORRAL_CLUSTER", "corral"))
    if s is None or not os.path.exists(kubeconfig.path(s)):
        return None
    return kubeconfig.path(s)


def _explicit_etcd(args: argparse.Namespace) -> str | None:
    return getattr(args, "etcd", None) or os.environ.get("CORRAL_ETCD")


def etcd_endpoints(args: argparse.Namespace) -> list[str]:
    """--etcd, else $CORRAL_ETCD, else the local cluster's etcd, else the default."""
    raw = _explicit_etcd(args)
    if raw:
        urls = [u for u in raw.split(",") if u.strip()]
    else:
        local = local_cluster(getattr(args, "cluster", None))
        urls = local[0] if local else [DEFAULT_ETCD]
    try:
        parse_endpoints(urls)
    except ValueError as e:
        raise CLIError(f"--etcd: {e}") from None
    return urls


def etcd_tls(args: argparse.Namespace) -> TLSFiles | None:
    """--etcd-cafile/--etcd-certfile/--etcd-keyfile (or $CORRAL_ETCD_CAFILE, ...), else the
    local cluster's operator certificate when its etcd is the one in use."""
    given = {
        field: getattr(args, f"etcd_{flag}", None) or os.environ.get(f"CORRAL_ETCD_{flag.upper()}")
        for flag, field in TLS_FLAGS
    }
    if any(given.values()):
        missing = [f"--etcd-{flag}" for flag, field in TLS_FLAGS if not given[field]]
        if missing:
            raise CLIError(
                "--etcd-cafile, --etcd-certfile and --etcd-keyfile go together; "
                f"missing {', '.join(missing)}"
            )
        tls = TLSFiles(**given)  # type: ignore[arg-type]
        try:
            tls.read()
        except ValueError as e:
            raise CLIError(str(e)) from None
        return tls
    if _explicit_etcd(args):
        return None
    local = local_cluster(getattr(args, "cluster", None))
    return local[1] if local else None


def new_store(args: argparse.Namespace, timeout: float = 5.0) -> Store:
    """A Store (not yet connected) for the etcd and certificate the flags name."""
    try:
        return Store(etcd_endpoints(args), timeout=timeout, tls=etcd_tls(args))
    except ValueError as e:
        raise CLIError(f"--etcd: {e}") from None


@contextlib.asynccontextmanager
async def store_from_args(args: argparse.Namespace) -> AsyncIterator[Store]:
    store = new_store(args, timeout=float(getattr(args, "etcd_timeout", 5.0) or 5.0))
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


async def admit(
    store: Store, objs: list[TypedObject], outcome: str = "nothing was created"
) -> None:
    """CLIError (saying `outcome`) if an object is in a namespace that does not exist or
    is terminating: what every verb that creates objects checks first."""
    try:
        await check_namespaces(store, objs)
    except NamespaceError as e:
        raise CLIError(f"{e}; {outcome}") from None


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


def add_etcd_option(p: argparse.ArgumentParser, suppress: bool = False, url: bool = True) -> None:
    """--etcd and its TLS files (`url=False`: the TLS files only). `suppress`: an absent
    flag leaves the attribute alone, so the same flag after the verb does not hide one
    given before it."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    if url:
        p.add_argument(
            "--etcd",
            metavar="URL[,URL...]",
            help="etcd endpoints (default: $CORRAL_ETCD, else the local cluster's)",
            **default,
        )
    for flag, what in (
        ("cafile", "the CA that signed etcd's certificate"),
        ("certfile", "this client's certificate"),
        ("keyfile", "this client's private key"),
    ):
        p.add_argument(
            f"--etcd-{flag}",
            metavar="FILE",
            help=f"mutual TLS to etcd: {what} (default: $CORRAL_ETCD_{flag.upper()}, else "
            "the local cluster's)",
            **default,
        )
