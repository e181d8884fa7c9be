"""The overlay's passes: make the kernel hold what the leases ask for.

A partial pass programs just the leases that changed since the last one (the
watch's fast path); a full pass, every resync_interval, on kernel damage and to
retry a failed pass, compares the kernel with every lease and repairs the
device, the per-peer entries, the guards, the host settings and the fast path.
Both run through one bounded-frequency runner, so they never overlap.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from corral.api import netconfig as config
from corral.api.informer import Informer
from corral.api.objects import NetworkConfig, NetworkSpec, SubnetLease
from corral.api.store import Store, subnet_key
from corral.api.tracker import ChangeTracker
from corral.daemon import metrics
from corral.daemon.runner import BoundedFrequencyRunner
from corral.ebpf import overlay_fastpath as fastpath
from corral.node import podguard
from corral.node.context import NodePaths
from corral.node.underlay import Underlay
from corral.overlay import files, guard, host
from corral.overlay.datapath import DatapathKeeper
from corral.overlay.lease import Lease
from corral.overlay.vxlan import DeviceSpec, Remote, VxlanNetlink

log = logging.getLogger("corral.overlay.agent")

# Runs a blocking netlink call on the agent's one netlink thread.
NetlinkCall = Callable[..., Awaitable[Any]]


@dataclass
class LocalOverlay:
    """This node's side of the overlay: found at start; the lease and spec change later."""

    node_name: str
    ns: str | None
    paths: NodePaths
    spec: NetworkSpec
    underlay: Underlay | None = None
    lease: Lease | None = None
    vtep_mac: str = ""

    @property
    def device(self) -> str:
        return config.device_name(self.spec.backend.vni)

    @property
    def subnet(self) -> str:
        assert self.lease is not None
        return self.lease.subnet

    @property
    def mtu(self) -> int:
        assert self.underlay is not None
        return self.spec.backend.mtu or self.underlay.mtu - config.VXLAN_OVERHEAD

    def write_subnet_file(self) -> None:
        """The contract with the CNI plugin (see docs/overlay.md)."""
        files.write_subnet_file(
            self.paths.subnet_file, self.spec, self.subnet, self.mtu, self.node_name
        )

    def device_spec(self) -> DeviceSpec:
        assert self.underlay is not None and self.lease is not None
        return DeviceSpec(
            name=self.device,
            vni=self.spec.backend.vni,
            port=self.spec.backend.port,
            local_ip=self.underlay.ip,
            underlay_index=self.underlay.index,
            mac=self.vtep_mac,
            mtu=self.mtu,
            subnet=self.lease.subnet,
        )


class Reconciler:
    """Partial and full passes over the VXLAN entries, guards, host settings and fast path."""

    def __init__(
        self,
        local: LocalOverlay,
        store: Store,
        leases: Informer[SubnetLease],
        vxlan: VxlanNetlink,
        on_netlink_thread: NetlinkCall,
        datapath: DatapathKeeper,
        *,
        resync_interval: float,
        kernel_events: bool,
        ip_forward: bool,
    ) -> None:
        self.local = local
        self.store = store
        self.leases = leases
        self.vxlan = vxlan
        self._netlink = on_netlink_thread
        self.datapath = datapath
        self.kernel_events = kernel_events
        self.ip_forward = ip_forward
        # lease key -> (entry before the first unapplied change, entry now)
        self.tracker: ChangeTracker[str, Remote] = ChangeTracker()
        self.runner = BoundedFrequencyRunner(
            "overlay",
            self._sync,
            0.0,
            resync_interval,
            retry_initial=min(1.0, resync_interval),
        )
        self._guarded: set[str] | None = None  # the peers the VXLAN guard last accepted
        self.reconciles = 0

    # ------------------------------------------------------------ what is wanted

    def as_remote(self, key: str, rec: SubnetLease | None) -> Remote | None:
        """The data path entry a lease asks for, or None (ours, incomplete, foreign)."""
        local = self.local
        if rec is None or not rec.vtep_mac or rec.node_name == local.node_name:
            return None
        if key != subnet_key(rec.subnet):  # not where the lease for its subnet lives
            return None
        if local.lease is not None and key == local.lease.key:
            return None
        sub = ipaddress.ip_network(rec.subnet)
        if not sub.subnet_of(ipaddress.ip_network(local.spec.network)):  # type: ignore[arg-type]
            return None
        return Remote(rec.subnet, rec.public_ip, rec.vtep_mac.lower())

    def remotes(self) -> list[Remote]:
        """Every other node's lease in this network, as data path entries."""
        out = [r for key, rec in self.leases.items() if (r := self.as_remote(key, rec))]
        return sorted(out, key=lambda r: ipaddress.ip_network(r.subnet))

    def encapsulated(self) -> list[Remote]:
        """The peers reached through VXLAN (not by direct routing)."""
        ul = self.local.underlay
        assert ul is not None
        direct = self.local.spec.backend.direct_routing
        return [r for r in self.remotes() if not (direct and ul.on_link(r.public_ip))]

    def lease_changed(self, old: SubnetLease | None, new: SubnetLease | None) -> None:
        """A lease came, went or changed: note its data path entry for the next pass."""
        key = subnet_key((new or old).subnet)  # type: ignore[union-attr]
        if self.tracker.record(key, self.as_remote(key, old), self.as_remote(key, new)):
            self.runner.run_soon()

    # ------------------------------------------------------------ passes

    async def ensure_device(self) -> None:
        local = self.local
        for change in await self._netlink(self.vxlan.ensure_device, local.device_spec()):
            log.info("%s: %s", local.device, change)

    async def apply_host_settings(self) -> None:
        loop = asyncio.get_running_loop()
        for c in await loop.run_in_executor(
            None, host.apply, self.local.ns, self.local.spec, self.ip_forward
        ):
            log.info("%s", c)

    async def reconcile(self) -> None:
        """Repair the device and make the per-peer entries match the leases."""
        local = self.local
        assert local.underlay is not None
        self.tracker.clear()  # this pass covers them
        await self.ensure_device()
        changes = await self._netlink(
            self.vxlan.sync_remotes,
            local.device,
            self.remotes(),
            local.underlay,
            local.spec.backend.direct_routing,
        )
        for c in changes:
            log.info("%s: %s", local.device, c)
        await self.guard(pods=True)
        if self.datapath.fastpath is not None:
            for c in await self._netlink(self.fastpath_pass, False):
                log.info("%s", c)
        await self._netlink(self.write_datapath_file)
        self.reconciles += 1

    async def apply_changes(self) -> None:
        """Program just the leases that changed since the last pass (the watch's fast path)."""
        local = self.local
        assert local.underlay is not None
        for old, new in self.tracker.take().values():
            for c in await self._netlink(
                self.vxlan.update_remote,
                local.device,
                old,
                new,
                local.underlay,
                local.spec.backend.direct_routing,
            ):
                log.info("%s: %s", local.device, c)
        fp = self.datapath.fastpath
        if fp is not None:
            for c in await self._netlink(
                fp.sync_peers, self.encapsulated(), local.underlay.on_link
            ):
                log.info("%s", c)
        await self.guard(pods=False)

    async def _resync_config(self) -> None:
        """Pick up ipMasq / directRouting changes; the address plan needs a restart."""
        local = self.local
        cfg = await self.store.get(NetworkConfig, config.CONFIG_NAME)
        if cfg is None or cfg.spec == local.spec:
            return
        if config.address_plan(cfg.spec) != config.address_plan(local.spec):
            log.error(
                "the cluster network's address plan changed in etcd; restart this "
                "node's agent to use it (keeping %s until then)",
                local.spec.network,
            )
            return
        local.spec = cfg.spec
        local.write_subnet_file()

    async def _sync(self, full: bool) -> None:
        """Changed leases as they come; everything, against the kernel, when `full`."""
        t0 = time.perf_counter()
        try:
            if not full:
                await self.apply_changes()
            else:
                try:
                    await self._resync_config()
                except Exception as e:  # etcd away: the kernel pass needs no etcd
                    log.warning(
                        "cannot re-read the network config (%s: %s); keeping the current one",
                        type(e).__name__,
                        e,
                    )
                await self.apply_host_settings()
                await self.reconcile()
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        metrics.RECONCILE_SECONDS.labels("full" if full else "changes").observe(
            time.perf_counter() - t0
        )

    def on_kernel_damage(self, kind: str, key: str) -> None:
        """Netlink reported a change: if it hit something we want, check everything now.

        Deletions of entries no lease asks for are our own removals; ignoring
        them keeps every lease removal from costing a full pass on every node.
        """
        if not self.kernel_events:
            return  # drift waits for the periodic pass (or `corral net check --fix`)
        if kind != "link":
            want = self.remotes()
            wanted = {
                "route": {r.subnet for r in want},
                "neighbour": {r.gateway for r in want},
                "fdb": {r.vtep_mac for r in want},
            }.get(kind, set())
            if key.lower() not in wanted:
                return
        if not self.runner.full_pending:
            log.info("%s: %s %s changed under us; repairing", self.local.device, kind, key)
        self.runner.run_soon(full=True)

    # ------------------------------------------------------------ guards

    async def guard(self, pods: bool) -> None:
        """VXLAN only from peers, none from pods; pods send only from their own address."""
        try:
            await self._apply_guards(pods)
        except Exception as e:  # the rest of the pass (routes, FDB, fast path) goes on
            log.error("cannot apply the overlay's guards (%s: %s); retrying", type(e).__name__, e)
            self._guarded = None

    async def _apply_guards(self, pods: bool) -> None:
        local = self.local
        ips = guard.peer_ips(self.remotes())
        if pods or ips != self._guarded:  # a full pass checks the kernel; the watch, changes
            ensure = functools.partial(
                guard.ensure, local.ns, local.spec.network, local.spec.backend.port, ips
            )
            for c in await asyncio.get_running_loop().run_in_executor(None, ensure):
                log.info("%s", c)
            self._guarded = ips
        fp = self.datapath.fastpath
        if fp is not None:
            for c in await self._netlink(fp.sync_peer_ips, ips):
                log.info("%s", c)
        if pods:
            for c in await self._netlink(self.guard_pods):
                log.info("%s", c)

    def guard_pods(self) -> list[str]:
        """The pod guard from every pod veth's alias (on the netlink thread)."""
        have = podguard.read(self.local.ns)  # first: see podguard.sync
        pods = podguard.pods_from_links(self.vxlan.ipr.get_links())
        return podguard.sync(self.local.ns, pods, have)

    # ------------------------------------------------------------ fast path

    def fastpath_pass(self, reattach: bool) -> list[str]:
        """Bring the fast path's maps and hooks in line (on the netlink thread)."""
        local, ul = self.local, self.local.underlay
        assert ul is not None and local.lease is not None
        index = self.vxlan.link_index(local.device)
        if index is None:
            return []  # the device is being repaired; the next pass follows
        want = fastpath.Settings(
            cluster=str(local.spec.network),
            subnet=local.lease.subnet,
            uplink_index=ul.index,
            local_ip=ul.ip,
            vni=local.spec.backend.vni,
            port=local.spec.backend.port,
            vtep_mac=local.vtep_mac,
            device_index=index,
        )
        return self.datapath.sync(
            self.vxlan.ipr, want, self.remotes(), self.encapsulated(), ul.on_link, reattach
        )

    def write_datapath_file(self) -> None:
        """`<run dir>/datapath.json`, rewritten by every full pass for whoever debugs the node."""
        files.write_datapath_file(self.local.paths.run_dir, self.datapath.doc())
