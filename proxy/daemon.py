"""`corral proxy`: the service proxy daemon on one node (core + a mode, on the skeleton).

One component, `Proxy`: the shared informers (Service, EndpointSlice) feed the
`ServiceTracker`; every change asks the `BoundedFrequencyRunner` for a sync
(bursts coalesce, runs at least `min_interval` apart, a full sync every
`max_interval`, failures retried as full syncs); the sync hands the views and
the changed keys to the mode in an executor. A canary check every
`canary_interval` asks for a full sync when someone flushed the tables.

Node set-up the mode relies on (idempotent, redone by every full sync):
- a route for the service CIDR on the overlay device (every sync until the
  device exists, then every full sync), so a VIP is routable
  from the node and from pods even on nodes whose default route is
  unreachable (REJECT for a service without endpoints happens in FORWARD and
  OUTPUT, after routing);
- `net.bridge.bridge-nf-call-iptables=1`, so replies bridged between two pods
  of one node pass conntrack (un-DNAT);
- the fast path's pinned `proxy_endpoints` map (when the node agent loaded the
  fast path) holds every endpoint, so replies of DNATed flows take the kernel path.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from typing import Any

from corral.api.informer import InformerFactory
from corral.api.store import Store
from corral.control.supervisor import Supervisor
from corral.daemon import metrics
from corral.daemon.runner import BoundedFrequencyRunner
from corral.proxy.core import ServiceTracker, ServiceView, usable
from corral.proxy.ebpf import EbpfMode
from corral.proxy.iptables import IptablesMode, SyncResult

log = logging.getLogger(__name__)

MODES = ("iptables", "ebpf", "auto")
BRIDGE_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"


class ModeUnavailable(RuntimeError):
    pass


def resolve_mode(mode: str) -> tuple[str, str]:
    """The mode to run and why: `auto` is ebpf when it can load here, else iptables.

    `--mode ebpf` where it cannot run raises ModeUnavailable saying what is missing.
    """
    if mode not in MODES:
        raise ModeUnavailable(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    if mode == "iptables":
        return mode, "asked for"
    from corral.proxy.ebpf import preflight

    why = preflight()
    if mode == "ebpf":
        if why:
            raise ModeUnavailable(f"--mode ebpf cannot run here: {why}")
        return mode, "asked for"
    if why:
        return "iptables", f"auto: the eBPF mode cannot run here ({why})"
    return "ebpf", "auto: BCC, kernel headers, cgroup2 and bpffs are present"


def endpoints_of(views: dict[str, ServiceView]) -> set[tuple[str, int, str]]:
    """Every (IP, port, protocol) the rules DNAT to: what the fast path leaves to the kernel."""
    out = set()
    for v in views.values():
        for sp in v.ports:
            out.update((e.ip, e.port, sp.protocol) for e in usable(v.endpoints_of(sp)))
    return out


class Proxy:
    def __init__(
        self,
        store: Store,
        informers: InformerFactory,
        node: str,
        *,
        min_interval: float = 0.1,
        max_interval: float = 30.0,
        canary_interval: float = 5.0,
        mode: IptablesMode | EbpfMode | None = None,
        node_setup: bool = True,
        mode_name: str = "iptables",
        fallback: bool = False,
        mode_note: str = "",
    ) -> None:
        self.store = store
        self.informers = informers
        self.node = node
        self.canary_interval = canary_interval
        self.node_setup = node_setup
        self.mode = mode
        self.mode_name = mode_name
        self.fallback = fallback  # auto: an eBPF load failure falls back to iptables
        self.mode_note = mode_note
        self.tracker = ServiceTracker(informers, self._changed)
        self.runner = BoundedFrequencyRunner(
            "proxy", self._sync, min_interval, max_interval, retry_initial=0.5, run_at_start=True
        )
        self.service_cidr: str | None = None
        self.device: str | None = None
        self.last: SyncResult | None = None
        self.synced_once = False
        self._route_ok = False
        self._bpf_map: Any = None
        self._bpf_have: set[tuple[str, int, str]] | None = None
        self._bpf_note = "not tried"
        self._views: dict[str, ServiceView] | None = None
        self._unregister: Any = None

    def _changed(self) -> None:
        metrics.PROXY_PENDING.set(len(self.tracker))
        self.runner.run_soon()

    async def start(self) -> None:
        from corral.overlay import config

        cfg = await config.load(self.store)
        spec = cfg.spec
        self.service_cidr = str(ipaddress.ip_network(spec.service_cidr))
        self.device = config.device_name(spec.backend.vni)
        if self.mode is None:
            if self.mode_name == "ebpf":
                self.mode = EbpfMode(spec.network, self.node)
            else:
                self.mode = IptablesMode(spec.network)
        log.info("proxy mode %s (%s)", self.mode.name, self.mode_note or "given")
        self.informers.start()

    async def run(self) -> None:
        await self.tracker.wait_synced()
        async with Supervisor() as sv:
            if isinstance(self.mode, EbpfMode):
                sv.start(self._load_ebpf(), "proxy-ebpf-load")
            sv.start(self.runner.run(), "proxy-runner")
            sv.start(self._canary_loop(), "proxy-canary")
            await sv.wait()

    async def _load_ebpf(self) -> None:
        """Compile in the background; the iptables rules serve pods until it is done."""
        assert isinstance(self.mode, EbpfMode)
        from corral.ebpf.loader import BPFUnavailable, CgroupError
        from corral.proxy.ebpf import explain

        try:
            await asyncio.get_running_loop().run_in_executor(None, self.mode.load)
        except (BPFUnavailable, CgroupError, OSError) as e:
            msg = explain(e)
            if not self.fallback:
                raise RuntimeError(f"--mode ebpf: {msg}") from None
            self.mode_note = f"auto: eBPF load failed, iptables only ({msg})"
            log.warning("%s", self.mode_note)
            return
        self.runner.run_soon(full=True)

    async def stop(self) -> None:
        # like every corral daemon: leave the kernel state; a restart converges on it
        self.tracker.remove()
        if isinstance(self.mode, EbpfMode):
            self.mode.sock.close()  # our handles only: the programs stay attached
        if self._bpf_map is not None:
            self._bpf_map.close()
            self._bpf_map = None

    def ready(self) -> bool:
        if isinstance(self.mode, EbpfMode):
            return self.synced_once and self.mode.ready()
        return self.synced_once

    async def _canary_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.canary_interval)
            if not self.synced_once or self.runner.full_pending:
                continue
            assert self.mode is not None
            ok = await loop.run_in_executor(None, self.mode.canary_ok)
            if not ok:
                log.warning("proxy canary chain gone (tables flushed by hand?): full resync")
                metrics.PROXY_REPAIRS.inc()
                self.mode.forget_kernel()
                self.runner.run_soon(full=True)

    async def _sync(self, full: bool) -> None:
        assert self.mode is not None
        loop = asyncio.get_running_loop()
        taken = self.tracker.take()
        metrics.PROXY_PENDING.set(len(self.tracker))
        # every view, kept up to date by the changed keys: rebuilding 10k views takes
        # ~0.2 s here, longer than the rest of a partial sync
        if full or self._views is None:
            self._views = self.tracker.views()
        else:
            for key in taken.changed:
                v = self.tracker.view(key)
                if v is None:
                    self._views.pop(key, None)
                else:
                    self._views[key] = v
        views = dict(self._views)  # a snapshot: the executor threads read it
        try:
            if self.node_setup and (full or not self._route_ok):
                await loop.run_in_executor(None, self._node_setup)
            result = await loop.run_in_executor(None, self.mode.sync, full, views, taken.changed)
            await loop.run_in_executor(None, self._sync_bpf_map, views, full)
        except Exception:
            metrics.PROXY_SYNC_ERRORS.inc()
            self._views = None  # the retry (a full sync) rebuilds them
            raise
        kind = "full" if result.full else "partial"
        now = time.time()
        metrics.PROXY_SYNC_SECONDS.labels(kind).observe(result.seconds)
        metrics.PROXY_RULES_WRITTEN.labels(kind).inc(result.lines)
        metrics.PROXY_LAST_SYNC.set(now)
        for t in taken.since.values():
            metrics.PROXY_PROGRAMMING_SECONDS.observe(max(0.0, now - t))
        self.last = result
        if not self.synced_once:
            log.info(
                "proxy programmed %d service(s) (%d rules) in %.3fs",
                len(views),
                result.lines,
                result.seconds,
            )
        self.synced_once = True

    # ------------------------------------------------------------ node set-up

    def _node_setup(self) -> None:
        with contextlib.suppress(OSError):
            with open(BRIDGE_NF) as f:
                on = f.read().strip() == "1"
            if not on:
                with open(BRIDGE_NF, "w") as f:
                    f.write("1\n")
                log.info("net.bridge.bridge-nf-call-iptables set to 1")
        self._ensure_route()

    def _ensure_route(self) -> None:
        from pyroute2 import IPRoute

        assert self.service_cidr and self.device
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self.device)
            if not links:
                self._route_ok = False  # no overlay device yet: the next sync tries again
                return
            ipr.route("replace", dst=self.service_cidr, oif=links[0], scope=253, proto=4)
            self._route_ok = True

    def _sync_bpf_map(self, views: dict[str, ServiceView], full: bool) -> None:
        from corral.ebpf.proxy_endpoints import EndpointsMap

        if self._bpf_map is None:
            try:
                self._bpf_map = EndpointsMap.open(self.node)
            except OSError as e:
                self._bpf_note = f"cannot open the fast path's map: {e}"
                log.warning("%s", self._bpf_note)
                return
            if self._bpf_map is None:
                self._bpf_note = "no fast path map pinned (kernel datapath, or not loaded yet)"
                return
            full = True
            log.info(
                "fast path map %s opened: replies of service flows stay on the kernel path",
                self._bpf_map.path,
            )
        want = endpoints_of(views)
        try:
            if full or self._bpf_have is None:
                self._bpf_have = self._bpf_map.entries()
            add, remove = want - self._bpf_have, self._bpf_have - want
            self._bpf_map.update(add, remove)
            self._bpf_have = want
            added, removed = len(add), len(remove)
        except OSError as e:
            # the agent may have reloaded with a new pin: reopen next time
            self._bpf_map.close()
            self._bpf_map = self._bpf_have = None
            raise RuntimeError(f"fast path endpoints map: {e}") from e
        self._bpf_note = f"map id {self._bpf_map.id}"
        if added or removed:
            log.debug("fast path endpoints: +%d -%d", added, removed)

    def debug_state(self) -> dict[str, Any]:
        last = self.last
        return {
            "mode": getattr(self.mode, "name", None),
            "modeNote": self.mode_note,
            "ebpf": self.mode.debug() if isinstance(self.mode, EbpfMode) else None,
            "services": len(self.tracker.views()),
            "pending": len(self.tracker),
            "serviceCIDR": self.service_cidr,
            "fastPathMap": self._bpf_note,
            "runs": self.runner.runs,
            "fullRuns": self.runner.full_runs,
            "failures": self.runner.failures,
            "lastSync": None
            if last is None
            else {
                "full": last.full,
                "services": last.services,
                "lines": last.lines,
                "seconds": round(last.seconds, 4),
                "conntrackFlushes": last.conntrack_flushes,
            },
        }


def cleanup(node: str | None, service_cidr: str | None = None) -> list[str]:
    """Remove everything the proxy made in this namespace (blocking)."""
    done = IptablesMode("0.0.0.0/0").cleanup()
    if node:
        done += remove_ebpf(node)
        from corral.ebpf.proxy_endpoints import EndpointsMap

        with contextlib.suppress(OSError, ValueError):
            m = EndpointsMap.open(node)
            if m is not None:
                gone = m.entries()
                m.update((), gone)
                m.close()
                done.append(f"fast path map: {len(gone)} endpoint(s)")
    if service_cidr:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr, contextlib.suppress(NetlinkError):
            ipr.route("del", dst=service_cidr, proto=4)
            done.append(f"route {service_cidr}")
    return done


def remove_ebpf(node: str) -> list[str]:
    """The eBPF mode's programs and pinned maps, gone (blocking; no BCC needed).

    Needs CAP_SYS_ADMIN (programs on a cgroup are found by id): `corral proxy
    --mode iptables` calls it before dropping privileges, so a node switched
    from the eBPF mode keeps nothing of it.
    """
    from corral.ebpf import proxy_sock

    try:
        return proxy_sock.remove_all(node)
    except (OSError, ValueError) as e:
        log.warning("cannot remove the eBPF mode's programs and maps: %s", e)
        return []
