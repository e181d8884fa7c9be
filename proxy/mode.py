"""The one interface every proxy mode implements, and the registry `--mode` picks from.

A mode turns the change tracker's service views into kernel state. The proxy
component (proxy/component.py) owns the informers, the bounded-frequency
runner, the canary loop, node set-up and the metrics; it talks to its mode
through `ProxyMode` only and never asks which mode it has (kube-proxy's
`Provider`, pkg/proxy/types.go, plays the same part).

Adding a mode (as nftables was): write one module with a class that
implements `ProxyMode` and add it to `_BUILTIN` below (or `register()` it).
`--mode NAME` then selects it, `--mode auto` considers it by `auto_rank`,
`unavailable()` refuses it up front with what is missing, `cleanup_node()`
serves `--cleanup`, and a node switched to another mode has its leftovers
removed (unless that mode `includes` it).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from corral.proxy.core import ServiceView

log = logging.getLogger(__name__)

AUTO = "auto"


class ModeUnavailable(RuntimeError):
    """An unknown mode, or one that cannot run here (the message says what is missing)."""


@dataclass
class SyncResult:
    full: bool
    services: int  # services written
    lines: int  # rules (or map entries) written
    seconds: float
    conntrack_flushes: int = 0
    sets_created: int = 0
    sets_destroyed: int = 0
    chains_deleted: int = 0


@dataclass
class ModeContext:
    """What a mode is made from on a node (`ProxyMode.for_node`)."""

    node: str
    cluster_cidr: str  # the pod network (clients outside it are masqueraded)
    # --mode auto: a mode whose late start-up fails (the eBPF programs' compile) keeps
    # serving with what it has and says so, instead of stopping the proxy
    fallback: bool = False


class ProxyMode(Protocol):
    """How services become kernel state. Blocking methods run in an executor, one at
    a time (never two syncs at once); `run` runs on the component's event loop."""

    name: ClassVar[str]
    # privilege profile the proxy keeps in this mode (daemon/privileges.py KEEP)
    privileges: ClassVar[str]
    # under --mode auto the available mode with the highest rank runs
    auto_rank: ClassVar[int]
    # modes whose kernel state this one keeps using: not removed when switching to it
    includes: ClassVar[tuple[str, ...]]

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this mode cannot run here (what is missing, how to fix it), or None."""

    @classmethod
    def for_node(cls, ctx: ModeContext) -> ProxyMode:
        """The mode as the proxy of node `ctx.node` runs it."""

    @classmethod
    def cleanup_node(cls, node: str) -> list[str]:
        """Remove every piece of kernel state this mode makes on `node` (blocking, before
        privileges are dropped); what was removed."""

    @property
    def written(self) -> Mapping[str, ServiceView]:
        """What the kernel holds, per service (the debug dump's `programmed`)."""

    async def run(self, ask_full_sync: Callable[[], None]) -> None:
        """Background work until cancelled (the eBPF mode compiles its programs and
        writes its iptables half here); `ask_full_sync` requests a full sync."""

    def sync(
        self, full: bool, views: Mapping[str, ServiceView], changed: Iterable[str]
    ) -> SyncResult:
        """Program `views`: every service when `full`, else the `changed` keys only."""

    def ready(self) -> bool:
        """Services are served (after at least one successful sync)."""

    def wants_sync(self) -> bool:
        """Work a sync does even without changes is pending (endpoints draining)."""

    def canary_ok(self) -> bool:
        """The kernel still holds what the mode wrote (False: someone removed it)."""

    def forget_kernel(self) -> None:
        """Drop what the mode believes the kernel holds; the next (full) sync re-reads it.
        Called on the event loop, never while `sync` runs."""

    def close(self) -> None:
        """Let go of handles; the kernel state stays (a restart converges on it)."""

    def debug(self) -> dict[str, Any]:
        """Keys merged into the proxy's debug dump (`kernel`, the mode's own, ...)."""


ModeClass = type[ProxyMode]

# name -> "module:Class", imported on first use (the eBPF mode's needs stay lazy)
_BUILTIN: dict[str, str] = {
    "iptables": "corral.proxy.iptables:IptablesMode",
    "ebpf": "corral.proxy.ebpf:EbpfMode",
    "nftables": "corral.proxy.nftables:NftablesMode",
}
_registry: dict[str, ModeClass | str] = dict(_BUILTIN)


def record_written(
    mode: Any, keys: Iterable[str], views: Mapping[str, ServiceView], full: bool
) -> None:
    """What a rule-writing mode does once its transaction is in: remember the views it
    wrote (`mode.written`), let the fast path's endpoint map follow, say it synced."""
    for key in keys:
        if key in views:
            mode.written[key] = views[key]
        else:
            mode.written.pop(key, None)
    if mode.fast_path is not None:
        mode.fast_path.after(full)
    mode.synced = True


def register(name: str, cls: ModeClass | str) -> None:
    """Make `--mode name` select `cls` (a class, or "module:Class" imported when used)."""
    if name == AUTO:
        raise ValueError(f"{AUTO!r} is not a mode name")
    _registry[name] = cls


def unregister(name: str) -> None:
    _registry.pop(name, None)


def names() -> tuple[str, ...]:
    """What `--mode` accepts: every registered mode, then `auto`."""
    return (*_registry, AUTO)


def mode_class(name: str) -> ModeClass:
    try:
        cls = _registry[name]
    except KeyError:
        raise ModeUnavailable(f"--mode {name!r}: choose from {', '.join(names())}") from None
    if isinstance(cls, str):
        module, _, attr = cls.partition(":")
        cls = _registry[name] = getattr(importlib.import_module(module), attr)
    return cls


def resolve(name: str) -> tuple[ModeClass, str]:
    """The mode to run and why. `auto` is the highest-ranked mode that can run here;
    a named mode that cannot raises ModeUnavailable saying what is missing."""
    if name != AUTO:
        cls = mode_class(name)
        why = cls.unavailable()
        if why:
            raise ModeUnavailable(f"--mode {name} cannot run here: {why}")
        return cls, "asked for"
    skipped = []
    for cls in sorted((mode_class(n) for n in _registry), key=lambda c: -c.auto_rank):
        why = cls.unavailable()
        if not why:
            if not skipped:
                return cls, f"auto: the {cls.name} mode can run here"
            return cls, "auto: " + "; ".join(skipped)
        skipped.append(f"the {cls.name} mode cannot run here ({why})")
    raise ModeUnavailable("--mode auto: no mode can run here: " + "; ".join(skipped))


def cleanup_node(node: str) -> list[str]:
    """Every registered mode's kernel state on `node`, removed (`--cleanup`)."""
    done: list[str] = []
    for name in list(_registry):
        done += mode_class(name).cleanup_node(node)
    return done


def remove_other_modes(cls: ModeClass, node: str) -> list[str]:
    """What modes other than `cls` (and those it includes) left on `node`: a node
    switched from another mode keeps nothing of it."""
    done: list[str] = []
    for name in list(_registry):
        if name != cls.name and name not in cls.includes:
            done += mode_class(name).cleanup_node(node)
    return done
