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
from collections import Counter
from typing import Any

from corral.api.informer import InformerFactory
from corral.api.store import Store
from corral.control.supervisor import Supervisor
from corral.daemon import metrics
from corral.daemon.runner import BoundedFrequencyRunner
from corral.node import sysctl
from corral.proxy.core import ServiceTracker, ServiceView, usable
from corral.proxy.ebpf import EbpfMode
from corral.proxy.iptables import IptablesMode, Kernel, SyncResult

log = logging.getLogger(__name__)

MODES = ("iptables", "ebpf", "auto")
BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"
DRAIN_BLIND = 600.0  # seconds a gone endpoint stays in the fast path map when conntrack fails


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


Endpoint = tuple[str, int, str]  # (IP, port, protocol)


def endpoints_of(views: dict[str, ServiceView]) -> set[Endpoint]:
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
        self._bpf_have: set[Endpoint] | None = None
        self._ep_of: dict[str, set[Endpoint]] = {}  # service -> endpoints its rules DNAT to
        self._ep_count: Counter[Endpoint] = Counter()
        # no rule DNATs to these any more, but conntrack may still hold their flows:
        # they stay in the fast path's map until it does not (endpoint -> since)
        self._draining: dict[Endpoint, float] = {}
        self._bpf_note = "not tried"
        self._unregister: Any = None
        self._forget_kernel = False

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
            if self._draining:
                self.runner.run_soon()  # its map phase re-checks the draining endpoints
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
        if full and self._forget_kernel:
            self._forget_kernel = False
            self.mode.forget_kernel()
        taken = self.tracker.take()
        metrics.PROXY_PENDING.set(len(self.tracker))
        views = self.tracker.views()  # a snapshot of the tracker's current views
        try:
            if self.node_setup and (full or not self._route_ok):
                await loop.run_in_executor(None, self._node_setup)
            # the fast path must hand a new endpoint's replies to conntrack before a
            # rule DNATs to it, and a gone one's only after no rule does any more
            added, gone = self._endpoint_delta(views, taken.changed, full)
            await loop.run_in_executor(None, self._sync_bpf_map, added, set(), full)
            result = await loop.run_in_executor(None, self.mode.sync, full, views, taken.changed)
            await loop.run_in_executor(None, self._sync_bpf_map, set(), gone, False, full, True)
        except Exception:
            metrics.PROXY_SYNC_ERRORS.inc()
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
            if sysctl.ensure(BRIDGE_NF, "1"):
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

    def _endpoint_delta(
        self, views: dict[str, ServiceView], changed: set[str], full: bool
    ) -> tuple[set[Endpoint], set[Endpoint]]:
        """Endpoints the rules start and stop DNATing to, from the changed services only
        (a count per endpoint: two services may share one)."""
        if full:
            self._ep_of.clear()
            self._ep_count.clear()
            keys = set(views)
        else:
            keys = changed
        added: set[Endpoint] = set()
        gone: set[Endpoint] = set()
        for k in keys:
            v = views.get(k)
            new = endpoints_of({k: v}) if v is not None else set()
            old = self._ep_of.pop(k, set())
            for e in new - old:
                self._ep_count[e] += 1
                if self._ep_count[e] == 1:
                    added.add(e)
            for e in old - new:
                self._ep_count[e] -= 1
                if self._ep_count[e] <= 0:
                    del self._ep_count[e]
                    gone.add(e)
            if new:
                self._ep_of[k] = new
        return added, gone

    def _sync_bpf_map(
        self,
        add: set[Endpoint],
        gone: set[Endpoint],
        reread: bool,
        prune: bool = False,
        after: bool = False,
    ) -> None:
        """Put `add` in the fast path's map (before a restore) and, `after` it, take
        out those of `gone` (and of the ones not wanted, with `prune`) that conntrack
        no longer holds flows of. `reread` reads the map first and adds every wanted
        endpoint it lacks."""
        from corral.ebpf.proxy_endpoints import EndpointsMap

        if self._bpf_map is None:
            if not add and not reread:
                return  # not open: the next sync that adds tries again
            try:
                self._bpf_map = EndpointsMap.open(self.node)
            except OSError as e:
                self._bpf_note = f"cannot open the fast path's map: {e}"
                log.warning("%s", self._bpf_note)
                return
            if self._bpf_map is None:
                self._bpf_note = "no fast path map pinned (kernel datapath, or not loaded yet)"
                return
            reread = True
            log.info(
                "fast path map %s opened: replies of service flows stay on the kernel path",
                self._bpf_map.path,
            )
        try:
            if reread or self._bpf_have is None:
                self._bpf_have = self._bpf_map.entries()
                add = add | (set(self._ep_count) - self._bpf_have)
            for e in add:
                self._draining.pop(e, None)
            if prune:
                gone = gone | (self._bpf_have - set(self._ep_count))
            gone = self._drained(gone) if after else set()
            self._bpf_map.update(add, gone)
            self._bpf_have = (self._bpf_have | add) - gone
        except OSError as e:
            # the agent may have reloaded with a new pin: reopen next time
            self._bpf_map.close()
            self._bpf_map = self._bpf_have = None
            raise RuntimeError(f"fast path endpoints map: {e}") from e
        self._bpf_note = f"map id {self._bpf_map.id}"
        if add or gone:
            log.debug("fast path endpoints: +%d -%d", len(add), len(gone))

    def _drained(self, gone: set[Endpoint]) -> set[Endpoint]:
        """Of the endpoints no rule uses any more (`gone` and those already draining),
        the ones conntrack holds no DNATed flow of: only those may leave the map.

        An endpoint that goes NotReady or is removed keeps its established
        connections (conntrack still DNATs them); if the fast path took its
        replies off the kernel path, a reply from another node would reach the
        client with the pod's address and the connection would hang.
        """
        now = time.monotonic()
        for e in gone:
            self._draining.setdefault(e, now)
        for e in [e for e in self._draining if e in self._ep_count]:
            del self._draining[e]  # wanted again
        if not self._draining:
            return set()
        live = Kernel().dnat_replies()
        if live is None:  # conntrack cannot say: keep them a while, then let go
            done = {e for e, t in self._draining.items() if now - t > DRAIN_BLIND}
        else:
            done = {e for e in self._draining if e not in live}
        for e in done:
            del self._draining[e]
        return done

    def resync(self) -> None:
        """A full sync now, re-reading the tables (the debug socket's `resync`).

        The mode forgets what it knows of the kernel at the start of that sync, on
        the loop, never while a sync runs in the executor."""
        self._forget_kernel = True
        self.runner.run_soon(full=True)

    def debug_state(self) -> dict[str, Any]:
        from corral.netdebug import nodeview

        last = self.last
        return {
            "kernel": {
                "nat": nodeview.iptables_chains(None, "nat"),
                "filter": nodeview.iptables_chains(None, "filter"),
                "ipsets": nodeview.ipsets(None),
            },
            "programmed": _programmed(getattr(self.mode, "written", {})),
            "syncPeriod": self.runner.max_interval,
            "mode": getattr(self.mode, "name", None),
            "modeNote": self.mode_note,
            "ebpf": self.mode.debug() if isinstance(self.mode, EbpfMode) else None,
            "services": len(self.tracker.views()),
            "pending": len(self.tracker),
            "serviceCIDR": self.service_cidr,
            "fastPathMap": self._bpf_note,
            "fastPathDraining": len(self._draining),
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


def _programmed(written: dict[str, ServiceView]) -> list[dict[str, Any]]:
    """What the mode last wrote, per service port: VIP, port, backends (for `corral net`)."""
    out = []
    for key, v in sorted(written.items()):
        for sp in v.ports:
            out.append(
                {
                    "service": key,
                    "port": sp.name,
                    "protocol": sp.protocol,
                    "clusterIP": sp.cluster_ip,
                    "servicePort": sp.port,
                    "nodePort": sp.node_port,
                    "affinityTimeout": sp.affinity_timeout,
                    "endpoints": [f"{e.ip}:{e.port}" for e in usable(v.endpoints_of(sp))],
                }
            )
    return out


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
