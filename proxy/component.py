"""`corral proxy`'s component: the run loop that drives one proxy mode on a node.

One component, `Proxy`, on the daemon skeleton: the shared informers
(Service, EndpointSlice) feed the `ServiceTracker`; every change asks the
`BoundedFrequencyRunner` for a sync (bursts coalesce, runs at least
`min_interval` apart, a full sync every `max_interval`, failures retried as
full syncs); the sync hands the views and the changed keys to the mode
(proxy/mode.py: whichever `--mode` picked, through `ProxyMode` only) in an
executor. A canary check every `canary_interval` asks for a full sync when
someone flushed the tables, or a plain one while the mode has work pending
(endpoints draining from the fast path's map).

Node set-up every mode relies on (idempotent, redone by every full sync):
- a route for the service CIDR on the overlay device (every sync until the
  device exists, then every full sync), so a VIP is routable
  from the node and from pods even on nodes whose default route is
  unreachable (REJECT for a service without endpoints happens in FORWARD and
  OUTPUT, after routing);
- `net.bridge.bridge-nf-call-iptables=1`, so replies bridged between two pods
  of one node pass conntrack (un-DNAT).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from corral.api.informer import InformerFactory
from corral.api.objects import NetworkConfig, NetworkSpec
from corral.api.store import Store
from corral.common.supervisor import Supervisor
from corral.daemon import metrics
from corral.daemon.runner import BoundedFrequencyRunner
from corral.node import netlink, sysctl
from corral.proxy import mode as modes
from corral.proxy.announce import Announcer
from corral.proxy.core import ServiceTracker, ServiceView, cluster_endpoints, external_endpoints
from corral.proxy.healthcheck import HealthServers
from corral.proxy.mode import ModeContext, ProxyMode, SyncResult

log = logging.getLogger(__name__)

BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"
NETWORK_CONFIG = "cluster"  # the cluster's one NetworkConfig (api/objects.py)
ROUTE_PROTO = 4  # static


def overlay_device(spec: NetworkSpec) -> str:
    """The node agent's VXLAN device, `corral.<VNI>`, the service CIDR's route goes on."""
    return f"corral.{spec.backend.vni}"


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
        mode: ProxyMode | None = None,
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
        self.fallback = fallback  # --mode auto (ModeContext.fallback)
        self.mode_note = mode_note
        self.tracker = ServiceTracker(informers, self._changed, node)
        self.runner = BoundedFrequencyRunner(
            "proxy", self._sync, min_interval, max_interval, retry_initial=0.5, run_at_start=True
        )
        self.service_cidr: str | None = None
        self.device: str | None = None
        self.last: SyncResult | None = None
        self.synced_once = False
        self._route_ok = False
        self._forget_kernel = False
        self.health = HealthServers()  # healthCheckNodePorts (LoadBalancer, policy Local)
        # LoadBalancer addresses this node wins, on its lo (a real node's set-up only)
        self.announcer = Announcer(informers, node, store) if node_setup else None

    def _changed(self) -> None:
        metrics.PROXY_PENDING.set(len(self.tracker))
        self.runner.run_soon()

    async def _network(self) -> NetworkSpec:
        """The cluster's network (the node agent or `corral up` writes it)."""
        while True:
            cfg = await self.store.get(NetworkConfig, NETWORK_CONFIG)
            if cfg is not None:
                return cfg.spec
            log.info("waiting for the cluster's NetworkConfig %r", NETWORK_CONFIG)
            await asyncio.sleep(1.0)

    async def start(self) -> None:
        if self.mode is None or self.node_setup:  # a given mode without set-up needs none
            spec = await self._network()
            self.service_cidr = str(ipaddress.ip_network(spec.service_cidr))
            self.device = overlay_device(spec)
            if self.mode is None:
                ctx = ModeContext(self.node, str(spec.network), fallback=self.fallback)
                self.mode = modes.mode_class(self.mode_name).for_node(ctx)
        log.info("proxy mode %s (%s)", self.mode.name, self.mode_note or "given")
        self.informers.start()

    async def run(self) -> None:
        assert self.mode is not None
        await self.tracker.wait_synced()
        async with Supervisor() as sv:
            sv.start(self.mode.run(self._ask_full_sync), f"proxy-{self.mode.name}")
            sv.start(self.runner.run(), "proxy-runner")
            sv.start(self._canary_loop(), "proxy-canary")
            if self.announcer is not None:
                sv.start(self.announcer.run(), "proxy-announce")
            await sv.wait()

    async def stop(self) -> None:
        # like every corral daemon: leave the kernel state; a restart converges on it
        self.tracker.remove()
        self.health.close()
        if self.announcer is not None:
            self.announcer.remove()
        if self.mode is not None:
            self.mode.close()

    def ready(self) -> bool:
        return self.synced_once and self.mode is not None and self.mode.ready()

    async def _canary_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.canary_interval)
            if not self.synced_once or self.runner.full_pending:
                continue
            assert self.mode is not None
            if self.mode.wants_sync():
                self.runner.run_soon()  # e.g. endpoints draining: the sync re-checks them
            ok = await loop.run_in_executor(None, self.mode.canary_ok)
            if not ok:
                log.warning("proxy canary failed (tables flushed by hand?): full resync")
                metrics.PROXY_REPAIRS.inc()
                self.resync()

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
            result = await loop.run_in_executor(None, self.mode.sync, full, views, taken.changed)
        except Exception:
            metrics.PROXY_SYNC_ERRORS.inc()
            raise
        await self.health.sync(views)
        self._record(result, views, taken.since.values())

    def _record(
        self, result: SyncResult, views: dict[str, ServiceView], since: Iterable[float]
    ) -> None:
        kind = "full" if result.full else "partial"
        now = time.time()
        metrics.PROXY_SYNC_SECONDS.labels(kind).observe(result.seconds)
        metrics.PROXY_RULES_WRITTEN.labels(kind).inc(result.lines)
        metrics.PROXY_LAST_SYNC.set(now)
        for t in since:
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
        assert self.service_cidr and self.device
        with netlink.iproute(None) as ipr:
            links = ipr.link_lookup(ifname=self.device)
            if not links:
                self._route_ok = False  # no overlay device yet: the next sync tries again
                return
            ipr.route("replace", dst=self.service_cidr, oif=links[0], scope=253, proto=ROUTE_PROTO)
            self._route_ok = True

    def _ask_full_sync(self) -> None:
        self.runner.run_soon(full=True)

    def resync(self) -> None:
        """A full sync now, re-reading the tables (the debug socket's `resync`).

        The mode forgets what it knows of the kernel at the start of that sync, on
        the loop, never while a sync runs in the executor. Also the canary's repair."""
        self._forget_kernel = True
        self.runner.run_soon(full=True)

    def debug_state(self) -> dict[str, Any]:
        last = self.last
        mode = self.mode
        return {
            **(mode.debug() if mode is not None else {}),
            "programmed": _programmed(mode.written if mode is not None else {}),
            "syncPeriod": self.runner.max_interval,
            "mode": None if mode is None else mode.name,
            "modeNote": self.mode_note,
            "services": len(self.tracker.views()),
            "pending": len(self.tracker),
            "serviceCIDR": self.service_cidr,
            "healthCheckNodePorts": self.health.debug(),
            "loadBalancer": None if self.announcer is None else self.announcer.debug(),
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


def _programmed(written: Mapping[str, ServiceView]) -> list[dict[str, Any]]:
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
                    "endpoints": [
                        f"{e.ip}:{e.port}" for e in cluster_endpoints(sp, v.endpoints_of(sp))
                    ],
                    "externalIPs": list(sp.external_ips),
                    "externalEndpoints": [
                        f"{e.ip}:{e.port}" for e in external_endpoints(sp, v.endpoints_of(sp))
                    ]
                    if sp.external
                    else [],
                }
            )
    return out


def cleanup(node: str, service_cidr: str | None = None) -> list[str]:
    """Remove everything the proxy made in this namespace, whichever mode made it
    (blocking): every registered mode's state, then the service CIDR's route."""
    from corral.proxy import announce

    done = modes.cleanup_node(node) + announce.cleanup()
    if service_cidr:
        from pyroute2.netlink.exceptions import NetlinkError

        with netlink.iproute(None) as ipr, contextlib.suppress(NetlinkError):
            ipr.route("del", dst=service_cidr, proto=ROUTE_PROTO)
            done.append(f"route {service_cidr}")
    return done
