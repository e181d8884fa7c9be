"""The eBPF mode: pods' service connections translated at connect()/sendmsg() in BPF.

A `ProxyMode` (proxy/mode.py), on the same core as the iptables mode. Two parts:

- `SockLB` (ebpf/proxy_sock.py): sock_addr programs on the node's cgroup2
  directory translate VIP:port to a backend for every pod process of the
  node: one hash lookup whatever the number of services, no conntrack NAT,
  the backend's own address on the wire (so the overlay fast path carries it
  unchanged). A sync writes only the changed services' map entries, in
  batches.
- the iptables mode's rules, kept for what no socket hook of the node's
  cgroup sees: NodePort and service traffic arriving from other nodes or the
  underlay, the node's own (host-network) processes, connected UDP sockets
  (see ebpf/proxy_sock.c) and SCTP. Pods' TCP and unconnected UDP never
  reach those rules: their packets already carry the backend's address.

The programs are compiled in the background (`run()` calls `load()` in an
executor, about a second of CPU); until they are attached the iptables rules
serve pods too, so nothing waits for BCC. Once they are, a sync writes the
maps and returns: the iptables half runs behind on its own
`BoundedFrequencyRunner` (changes that arrive meanwhile coalesce into one
restore; a failure is retried as a full sync), so pods follow a change in
milliseconds whatever a restore costs. A restarted proxy finds the
previous run's programs attached and maps pinned: traffic is translated all
through the restart, and the new load replaces the programs atomically and
diffs against what the maps hold.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from corral.daemon import metrics
from corral.daemon.runner import BoundedFrequencyRunner
from corral.ebpf import loader, proxy_sock
from corral.proxy.core import ServiceView, cluster_endpoints, usable
from corral.proxy.fastpath_endpoints import FastPathEndpoints
from corral.proxy.iptables import IptablesMode, Netfilter
from corral.proxy.mode import ModeContext, SyncResult

log = logging.getLogger(__name__)

# the iptables half follows the syncs it is handed; the component's own periodic
# full sync reaches it as one of those, so its runner has no period of its own
RULES_MAX_INTERVAL = 24 * 3600.0


def preflight() -> str | None:
    """Why the eBPF mode cannot run here (what is missing and how to fix it), or None."""
    why = loader.unavailable()
    if why:
        return why
    why = proxy_sock.cgroup2_missing()
    if why:
        return why
    try:
        loader.ensure_bpffs()  # mounted already: nothing to do
    except OSError as e:
        return f"no BPF filesystem at {loader.BPFFS} ({e}): mount -t bpf bpf {loader.BPFFS}"
    return None


def node_cgroup(node: str) -> str:
    """The node's cgroup2 directory, where the programs attach (every pod lives below)."""
    from corral.node.cgroups import node_unified_dir

    return node_unified_dir(node)


def sock_entries(
    views: Mapping[str, ServiceView], names: Iterable[str]
) -> dict[str, dict[proxy_sock.SvcKey, proxy_sock.Entry]]:
    """The socket programs' records of these services (a name without a view: none)."""
    out: dict[str, dict[proxy_sock.SvcKey, proxy_sock.Entry]] = {}
    for name in names:
        view, got = views.get(name), out.setdefault(name, {})
        for sp in view.ports if view is not None else ():
            if sp.protocol in proxy_sock.PROTOCOLS:
                all_eps = view.endpoints_of(sp)  # type: ignore[union-attr]
                eps = cluster_endpoints(sp, all_eps)  # internalTrafficPolicy applied
                if not eps and usable(all_eps):
                    # Local with none on this node: no entry, so the connection goes on
                    # untranslated to the iptables half's DROP (kube-proxy drops it;
                    # the programs could only refuse)
                    continue
                backends = tuple(sorted({(e.ip, e.port) for e in eps}))
                entry = proxy_sock.Entry(backends[: proxy_sock.MAX_BACKENDS], sp.affinity_timeout)
                got[(sp.cluster_ip, sp.port, sp.protocol)] = entry
    return out


def explain(e: Exception) -> str:
    text = str(e)
    if "Operation not permitted" in text or "EPERM" in text:
        text += (
            " (the eBPF mode needs root with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN; "
            "use --mode iptables where that is not allowed)"
        )
    return text


class EbpfMode:
    name: ClassVar[str] = "ebpf"
    privileges: ClassVar[str] = "proxy-ebpf"
    auto_rank: ClassVar[int] = 20
    includes: ClassVar[tuple[str, ...]] = ("iptables",)  # its rules are part of this mode

    def __init__(
        self,
        cluster_cidr: str,
        node: str,
        sock: proxy_sock.SockLB | None = None,
        netfilter: Netfilter | None = None,
        *,
        fast_path: FastPathEndpoints | None = None,
        fallback: bool = False,
    ) -> None:
        self.node = node
        self.iptables = IptablesMode(cluster_cidr, netfilter, fast_path)
        self.sock = sock or proxy_sock.SockLB(node, node_cgroup(node))
        self.fallback = fallback  # --mode auto: a failed load leaves the iptables rules alone
        self.loaded = False
        self.attached = False
        self.note = ""
        self.entries_written = 0
        self.last_map_seconds = 0.0
        self._maps_written: Mapping[str, ServiceView] = {}
        # the iptables half: syncs hand it their views and changed keys (under _lock,
        # from the executor) and ask its runner for a run (on the loop)
        self.rules = BoundedFrequencyRunner(
            "proxy-ebpf-iptables",
            self._write_rules,
            min_interval=0.0,
            max_interval=RULES_MAX_INTERVAL,
            retry_initial=0.5,
            retry_max=30.0,
        )
        self._lock = threading.Lock()
        self._views: Mapping[str, ServiceView] | None = None
        self._changed: set[str] = set()
        self._full_pending = False  # a full sync asked for before run() started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forget = False
        self.rules_busy = False
        self.rules_synced = 0
        self.rules_last: SyncResult | None = None

    # ------------------------------------------------------------ the registry's side

    @classmethod
    def unavailable(cls) -> str | None:
        return preflight()

    @classmethod
    def for_node(cls, ctx: ModeContext) -> EbpfMode:
        nf = Netfilter()
        fast_path = FastPathEndpoints(ctx.node, nf.dnat_replies)
        return cls(ctx.cluster_cidr, ctx.node, None, nf, fast_path=fast_path,
                   fallback=ctx.fallback)  # fmt: skip

    @classmethod
    def cleanup_node(cls, node: str) -> list[str]:
        """The programs and pinned maps (no BCC needed; CAP_SYS_ADMIN: programs on a
        cgroup are found by id). The iptables half is the iptables mode's to remove."""
        try:
            return proxy_sock.remove_all(node, node_cgroup(node))
        except (OSError, ValueError) as e:
            log.warning("cannot remove the eBPF mode's programs and maps: %s", e)
            return []

    # ------------------------------------------------------------ running

    async def run(self, ask_full_sync: Callable[[], None]) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            handed = self._views is not None  # a sync came before the loop ran
        rules = asyncio.create_task(self.rules.run(), name="proxy-ebpf-iptables")
        if handed:
            self.rules.run_soon(self._full_pending)
        try:
            if not self.loaded:
                await self._load(ask_full_sync)
            await rules
        finally:
            rules.cancel()

    async def _load(self, ask_full_sync: Callable[[], None]) -> None:
        """Compile in the background; the iptables rules serve pods until it is done."""
        assert self._loop is not None
        try:
            await self._loop.run_in_executor(None, self.load)
        except (loader.BPFUnavailable, loader.CgroupError, OSError) as e:
            msg = explain(e)
            if not self.fallback:
                raise RuntimeError(f"--mode ebpf: {msg}") from None
            self.note = f"auto: eBPF load failed, iptables only ({msg})"
            log.warning("%s", self.note)
            return
        ask_full_sync()

    def load(self) -> None:
        """Compile and load the programs (blocking, ~1 s); raises BPFUnavailable."""
        t0 = time.monotonic()
        self.sock.load()
        self.loaded = True
        log.info("eBPF proxy programs compiled and loaded in %.2fs", time.monotonic() - t0)

    def sync(
        self, full: bool, views: Mapping[str, ServiceView], changed: Iterable[str]
    ) -> SyncResult:
        changed = set(changed)
        # the maps first: pods' new connections follow a change in milliseconds, whatever
        # the iptables restore of the same change costs afterwards
        t0, n = time.monotonic(), 0
        if self.loaded:
            n = self._write_maps(views, None if full or not self.attached else changed)
            self._maps_written = views
            if not self.attached:
                self._attach()
            self.entries_written += n
        self.last_map_seconds = time.monotonic() - t0
        # the rules (which serve pods too until the programs are on) follow behind
        with self._lock:
            self._views = views
            self._changed |= changed
            loop = self._loop
            self._full_pending |= full
        if loop is not None:  # else run(), when it starts, hands the rules to the runner
            loop.call_soon_threadsafe(self.rules.run_soon, full)
        return SyncResult(full, len(changed), n, self.last_map_seconds)

    async def _write_rules(self, full: bool) -> None:
        """One run of the iptables half: the latest views, every key changed since."""
        assert self._loop is not None
        if self._forget:
            self._forget = False
            self.iptables.forget_kernel()
            full = True
        with self._lock:
            views, changed, self._changed = self._views, self._changed, set()
            self._full_pending = False
        if views is None:
            return  # no sync handed anything yet
        self.rules_busy = True
        try:
            self.rules_last = await self._loop.run_in_executor(
                None, self.iptables.sync, full, views, changed
            )
        except Exception:
            metrics.PROXY_SYNC_ERRORS.inc()
            raise  # the runner logs it and retries with a full sync
        finally:
            self.rules_busy = False
        self.rules_synced += 1

    # ------------------------------------------------------------ the one place for the maps

    def _write_maps(self, views: Mapping[str, ServiceView], changed: set[str] | None) -> int:
        records = sock_entries(views, views if changed is None else changed)
        return self.sock.sync(records, changed)

    def _attach(self) -> None:
        how = self.sock.attach()
        self.attached = True
        log.info(
            "eBPF proxy programs on %s (%s); maps pinned under %s",
            self.sock.cgroup,
            ", ".join(f"{k} {v}" for k, v in sorted(how.items())),
            loader.pin_dir(self.node),
        )

    # ------------------------------------------------------------ the rest of ProxyMode

    @property
    def written(self) -> Mapping[str, ServiceView]:
        return self._maps_written if self.attached else self.iptables.written

    def ready(self) -> bool:
        """Services are served: the programs are on, or the first iptables sync is done."""
        return self.attached or self.rules_synced > 0

    def wants_sync(self) -> bool:
        return self.iptables.wants_sync()

    def canary_ok(self) -> bool:
        if self.attached and not self.sock.attached_ok():
            log.warning("eBPF proxy programs gone from %s: reattaching", self.sock.cgroup)
            self.attached = False
            return False
        if self.rules_synced == 0 or self.rules_busy:
            return True  # the rules are being written behind: nothing to judge yet
        return self.iptables.canary_ok()

    def forget_kernel(self) -> None:
        self._forget = True  # the iptables half forgets at the start of its next run
        self.sock.have = None

    def close(self) -> None:
        self.sock.close()  # our handles only: the programs stay attached
        self.iptables.close()

    def debug(self) -> dict[str, Any]:
        last = self.rules_last
        return {
            **self.iptables.debug(),
            "ebpf": {
                "loaded": self.loaded,
                "attached": self.attached,
                "note": self.note,
                "cgroup": self.sock.cgroup,
                "pins": loader.pin_dir(self.node),
                "servicePorts": len(self.sock.have or {}),
                "entriesWritten": self.entries_written,
                "batches": self.sock.batches,
                "iptablesBehind": {
                    "runs": self.rules.runs,
                    "errors": self.rules.failures,
                    "busy": self.rules_busy,
                    "lastSeconds": None if last is None else round(last.seconds, 4),
                },
            },
        }
