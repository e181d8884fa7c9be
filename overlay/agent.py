"""The overlay node component: lease a subnet, program VXLAN, keep both in step with etcd.

`OverlayAgent(ctx)` follows the node component contract (start/run/stop, see
docs/internals.md); `corral node --components overlay` runs it alone, and
`--netns NAME` makes it program another network namespace than the one it runs
in (the etcd connection stays in its own): tests drive several simulated nodes
from the host namespace that way.

Options come from `ctx.options` (`corral.node.context.NodeOptions`): `netns`,
`resync_interval`, `lease_ttl`, `ip_forward`, `kernel_events` and `datapath`
(overlay/datapath.py). This module keeps the lease and the component's life;
the passes are overlay/reconcile.py's, the netlink calls overlay/vxlan.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from corral.api import netconfig as config
from corral.api.informer import Informer, Registration
from corral.api.objects import NetworkSpec, Node, NodeAddress, NodeSpec, NodeStatus, SubnetLease
from corral.api.store import SUBNETS_PREFIX, AlreadyExists, NotFound
from corral.common.metrics import register_collector
from corral.daemon import metrics
from corral.daemon.nodecontext import NodeContext
from corral.node import underlay
from corral.node.netlink import random_mac
from corral.overlay import files, lease
from corral.overlay.datapath import DatapathKeeper
from corral.overlay.reconcile import LocalOverlay, Reconciler
from corral.overlay.vxlan import EventMonitor, VxlanNetlink

log = logging.getLogger("corral.overlay.agent")


class OverlayAgent:
    """One node's overlay: its subnet lease, its VXLAN device and the entries for every peer."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        opts = ctx.options
        self.namespace = opts.netns
        self.lease_ttl = opts.lease_ttl
        self.local = LocalOverlay(ctx.node_name, opts.netns, ctx.paths, NetworkSpec())
        self.vxlan = VxlanNetlink(self.namespace)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="corral-overlay-netlink")
        self.datapath = DatapathKeeper(opts.datapath, ctx.node_name, opts.netns)
        # Every node's lease, through the node's shared informer (raw keys: a lease is
        # not a typed object; its key is its subnet).
        self.leases: Informer[SubnetLease] = ctx.informers.raw(SUBNETS_PREFIX, lease.decode)
        self._leases_reg: Registration | None = None
        self.passes = Reconciler(
            self.local,
            self.store,
            self.leases,
            self.vxlan,
            self._on_netlink_thread,
            self.datapath,
            resync_interval=opts.resync_interval,
            kernel_events=opts.kernel_events,
            ip_forward=opts.ip_forward,
        )
        self.leaser: lease.SubnetLeaser | None = None
        self._check_lease = asyncio.Event()
        self._pods_dirty = asyncio.Event()
        self._pod_links: set[int] = set()  # ifindexes link events named since the last update
        self._monitor: EventMonitor | None = None
        self._unregister_metrics: Any = None

    async def _on_netlink_thread(self, fn: Any, *args: Any) -> Any:
        """Run a blocking netlink call on the agent's one netlink thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args)
        )

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        local = self.local
        cfg = await config.load(self.store)
        local.spec = cfg.spec
        if local.spec.backend.type != "vxlan":
            raise config.ConfigError(f"backend {local.spec.backend.type!r} is not supported")
        local.underlay = ul = await self._on_netlink_thread(
            self._find_underlay, self.ctx.underlay_iface, self.ctx.underlay_ip
        )
        config.check_underlay(local.spec, [ul.ip])
        if local.mtu > ul.mtu - config.VXLAN_OVERHEAD:
            log.warning(
                "backend.mtu %d is larger than the underlay allows (%d - %d): large "
                "packets will be fragmented or dropped",
                local.mtu,
                ul.mtu,
                config.VXLAN_OVERHEAD,
            )
        state = files.load_state(self.ctx.paths.state_dir)
        local.vtep_mac = (
            state.get("vtepMAC")
            or await self._on_netlink_thread(self.vxlan.device_mac, local.device)
            or random_mac()
        )
        self._save_state()
        self.leaser = lease.SubnetLeaser(
            self.store, local.node_name, ul.ip, local.vtep_mac, local.spec, ttl=self.lease_ttl
        )
        await self._adopt(
            await self.leaser.acquire(preferred=state.get("subnet")), previous=state.get("subnet")
        )
        await self.passes.apply_host_settings()
        if self._leases_reg is None:
            self._leases_reg = self.leases.on_change(self._lease_changed)
        self.ctx.informers.start()
        # The handler has seen the initial list, so the pass below covers what it recorded.
        await self._leases_reg.wait_synced()
        for c in await self._on_netlink_thread(self.datapath.prepare, self.vxlan.ipr):
            log.info("%s", c)
        if self.datapath.mode == "kernel":
            await self._on_netlink_thread(self.passes.write_datapath_file)
        await self.passes.reconcile()
        # Pod veth events always (the fast path follows pods by them); damage events
        # (a deleted route, FDB entry...) only repair at once with kernel_events.
        loop = asyncio.get_running_loop()
        self._monitor = EventMonitor(
            self.namespace,
            local.device,
            lambda kind, key: loop.call_soon_threadsafe(self._on_kernel_event, kind, key),
        )
        self._monitor.start(await self._on_netlink_thread(self.vxlan.link_index, local.device))
        self._unregister_metrics = register_collector(self.datapath.metrics)
        log.info(
            "overlay ready: node %s subnet %s on %s (%s), %s mtu %d, %d peer(s), %s",
            local.node_name,
            local.subnet,
            ul.iface,
            ul.ip,
            local.device,
            local.mtu,
            len(self.passes.remotes()),
            "kernel datapath"
            if self.datapath.mode == "kernel"
            else "kernel datapath until the eBPF fast path is loaded",
        )

    def _find_underlay(self, iface: str | None, ip: str | None) -> underlay.Underlay:
        return underlay.find(self.vxlan.ipr, iface, ip)

    def _save_state(self) -> None:
        local = self.local
        subnet = local.lease.subnet if local.lease else None
        files.save_state(self.ctx.paths.state_dir, subnet, local.vtep_mac)

    async def _load_fastpath(self) -> None:
        """Compile and attach the fast path, off the start-up path.

        Compiling takes about a second of CPU; pods need not wait for it: until
        it is done the kernel's path (or a previous run's programs, still
        attached) carries their traffic, and nothing changes on the wire.
        """
        if self.datapath.mode == "kernel":
            return
        if await asyncio.get_running_loop().run_in_executor(None, self.datapath.load):
            for c in await self._on_netlink_thread(self.passes.fastpath_pass, True):
                log.info("%s", c)
        await self._on_netlink_thread(self.passes.write_datapath_file)
        fp = self.datapath.fastpath
        if fp is not None:
            log.info("eBPF fast path on: %d pod(s), %d peer(s)", fp.pod_count, fp.peer_count)

    # ------------------------------------------------------------ the lease

    async def _adopt(self, new: lease.Lease, previous: str | None) -> None:
        """Take `new` as this node's lease: device address, subnet file, Node.spec.podCIDR."""
        if previous and new.subnet != previous:
            log.error(
                "SUBNET CHANGED for node %s: %s -> %s (the old subnet is held by another "
                "node). Pods already running here keep their %s addresses and stay reachable "
                "from this node, but not across nodes, until they are recreated.",
                self.ctx.node_name,
                previous,
                new.subnet,
                previous,
            )
        self.local.lease = new
        self._save_state()
        await self.passes.ensure_device()
        self.local.write_subnet_file()
        await self._set_pod_cidr(new.subnet)

    async def _set_pod_cidr(self, subnet: str) -> None:
        def change(n: Node) -> Node | None:
            if n.spec.pod_cidr == subnet and n.spec.pod_cidrs == [subnet]:
                return None
            n.spec.pod_cidr, n.spec.pod_cidrs = subnet, [subnet]
            return n

        name = self.ctx.node_name
        try:
            await self.store.modify(Node, name, None, change)
            return
        except NotFound:
            pass
        assert self.local.underlay is not None
        node = Node(
            metadata={"name": name},
            spec=NodeSpec(pod_cidr=subnet, pod_cidrs=[subnet]),
            status=NodeStatus(
                addresses=[
                    NodeAddress(type="InternalIP", address=self.local.underlay.ip),
                    NodeAddress(type="Hostname", address=name),
                ]
            ),
        )
        try:
            await self.store.create(node)
        except AlreadyExists:
            await self.store.modify(Node, name, None, change)

    async def _lease_loop(self) -> None:
        interval = max(self.lease_ttl / 3, 0.5)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_lease.wait(), interval)
            self._check_lease.clear()
            current = self.local.lease
            assert current is not None and self.leaser is not None
            try:
                if await self.leaser.renew(current):
                    metrics.LEASE_RENEWALS.labels("ok").inc()
                    continue
            except Exception as e:
                metrics.LEASE_RENEWALS.labels("failed").inc()
                log.warning("cannot renew the subnet lease (%s: %s); retrying", type(e).__name__, e)
                continue
            metrics.LEASE_RENEWALS.labels("lost").inc()
            log.warning(
                "subnet lease for %s was lost (expired or deleted); re-acquiring", current.subnet
            )
            old = current.subnet
            await self._adopt(await self.leaser.acquire(preferred=old), previous=old)
            self.passes.runner.run_soon(full=True)

    def _lease_changed(self, old: SubnetLease | None, new: SubnetLease | None) -> None:
        own = self.local.lease
        for rec in (old, new):
            if rec is not None and own is not None and rec.subnet == own.subnet:
                self._check_lease.set()
        self.passes.lease_changed(old, new)

    # ------------------------------------------------------------ kernel events and pods

    def _on_kernel_event(self, kind: str, key: str) -> None:
        if kind == "pod":
            self._pod_links.add(int(key))
            self._pods_dirty.set()
        else:
            self.passes.on_kernel_damage(kind, key)

    async def _pods_loop(self) -> None:
        """A pod veth came, went or changed: update the fast path's pods map and hooks."""
        while True:
            await self._pods_dirty.wait()
            self._pods_dirty.clear()
            links, self._pod_links = self._pod_links, set()
            fp = self.datapath.fastpath
            if fp is not None:
                try:
                    for c in await self._on_netlink_thread(fp.update_links, self.vxlan.ipr, links):
                        log.info("%s", c)
                except Exception:
                    log.exception("fast path pod sync failed; the periodic pass retries")
            try:  # CNI ADD guarded the veth already; this covers veths made by others
                for c in await self._on_netlink_thread(self.passes.guard_pods):
                    log.info("%s", c)
            except Exception:
                log.exception("pod guard sync failed; the periodic pass retries")

    # ------------------------------------------------------------ run

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(c, name=f"overlay-{n}")
            for n, c in (
                ("lease", self._lease_loop()),
                ("reconcile", self.passes.runner.run()),
                ("pods", self._pods_loop()),
                ("fastpath", self._load_fastpath()),
            )
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def ready(self) -> bool:
        return self.local.lease is not None and self.passes.reconciles > 0

    def resync(self) -> None:
        """A full repair pass now (the debug socket's `resync`, `corral net check --fix`)."""
        self.passes.runner.run_soon(full=True)

    def debug_state(self) -> dict[str, Any]:
        local, ul, spec = self.local, self.local.underlay, self.local.spec
        return {
            "subnet": local.lease.subnet if local.lease else None,
            "underlay": {"iface": ul.iface, "ip": ul.ip} if ul else None,
            "device": local.device,
            "vtepMAC": local.vtep_mac,
            "peers": {
                key: {"node": r.node_name, "publicIP": str(r.public_ip), "vtepMAC": r.vtep_mac}
                for key, r in sorted(self.leases.items())
            },
            **self.datapath.debug_state(),
            "reconciles": self.passes.reconciles,
            "mtu": local.mtu if ul else None,
            "underlayMTU": ul.mtu if ul else None,
            "vni": spec.backend.vni,
            "port": spec.backend.port,
            "directRouting": spec.backend.direct_routing,
            "resyncInterval": self.ctx.options.resync_interval,
            "kernelEvents": self.passes.kernel_events,
            **self._kernel_view(),
        }

    def _kernel_view(self) -> dict[str, Any]:
        """What the kernel holds (routes, neighbours, FDB, device, links with their tc
        programs, the fast path's maps), read on the netlink thread for `corral net`."""
        from corral.ebpf.loader import attached
        from corral.node import nodeview

        def read() -> dict[str, Any]:
            ipr = self.vxlan.ipr
            view: dict[str, Any] = {
                "kernel": nodeview.overlay(ipr, self.local.device),
                "links": nodeview.links(ipr, attached),
            }
            if self.datapath.fastpath is not None:
                view["fastpathMaps"] = nodeview.fastpath_maps(self.datapath.fastpath)
            return view

        try:
            return self._pool.submit(read).result(timeout=5)
        except Exception as e:  # the rest of the dump is still worth having
            return {"kernelError": f"{type(e).__name__}: {e}"}

    # ------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Leave kernel state and the lease as they are: a restart picks both up."""
        if self._leases_reg is not None:
            self._leases_reg.remove()
            self._leases_reg = None
        if self._unregister_metrics is not None:
            self._unregister_metrics()
            self._unregister_metrics = None
        if self._monitor is not None:
            self._monitor.stop()
        with contextlib.suppress(Exception):
            await self._on_netlink_thread(self.datapath.close)
        with contextlib.suppress(Exception):
            await self._on_netlink_thread(self.vxlan.close)
        self._pool.shutdown(wait=False)
