"""The overlay node component: lease a subnet, program VXLAN, keep both in step with etcd.

`OverlayAgent(ctx)` follows the node component contract (start/run/stop, see
docs/internals.md). It can also run on its own:

    python -m corral.overlay.agent --node node-1 --etcd http://10.0.0.1:2379

`--netns NAME` makes it program another network namespace than the one it runs
in (the etcd connection stays in its own); tests use that to drive several
simulated nodes from the host namespace without giving them a path to etcd.

Options come from `ctx.options` (`corral.node.context.NodeOptions`): `netns`,
`resync_interval`, `lease_ttl`, `ip_forward`, `kernel_events` and `datapath`
("auto": the eBPF fast path of ebpf/overlay_fastpath.py when BCC can load it, else the
kernel's path; "bpf": the fast path or fail; "kernel": the kernel's path only,
any corral programs removed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from corral.api import netconfig as config
from corral.api.informer import Informer, Registration
from corral.api.objects import (
    NetworkConfig,
    NetworkSpec,
    Node,
    NodeAddress,
    NodeSpec,
    NodeStatus,
    SubnetLease,
)
from corral.api.store import (
    SUBNETS_PREFIX,
    AlreadyExists,
    NotFound,
    Store,
    StoreError,
    subnet_key,
)
from corral.api.tracker import ChangeTracker
from corral.common.files import write_json_atomic
from corral.common.metrics import counter_family, register_collector
from corral.daemon import metrics
from corral.daemon.nodecontext import NodeContext
from corral.daemon.runner import BoundedFrequencyRunner
from corral.ebpf import overlay_fastpath as fastpath
from corral.node import netns, podguard
from corral.node.context import DATAPATHS, NodeOptions, NodePaths
from corral.overlay import guard, lease, masq, notrack
from corral.overlay.vxlan import DeviceSpec, EventMonitor, Kernel, Remote, Underlay, random_mac

log = logging.getLogger("corral.overlay.agent")

STATE_FILE = "overlay.json"
DATAPATH_FILE = "datapath.json"


class OverlayAgent:
    """One node's overlay: its subnet lease, its VXLAN device and the entries for every peer."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        opts = ctx.options
        self.namespace = opts.netns
        self.resync_interval = opts.resync_interval
        self.lease_ttl = opts.lease_ttl
        self.ip_forward = opts.ip_forward
        self.kernel_events = opts.kernel_events
        self.datapath = opts.datapath
        self.fastpath: fastpath.FastPath | None = None
        self._datapath_why = "datapath kernel was asked for"
        self._pods_dirty = asyncio.Event()
        self._pod_links: set[int] = set()  # ifindexes link events named since the last update
        self._monitor: EventMonitor | None = None
        self.kernel = Kernel(self.namespace)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="corral-overlay-netlink")
        self._check_lease = asyncio.Event()
        # Every node's lease, through the node's shared informer (raw keys: a lease is
        # not a typed object; its key is its subnet).
        self.leases: Informer[SubnetLease] = ctx.informers.raw(SUBNETS_PREFIX, lease.decode)
        self._leases_reg: Registration | None = None
        # lease key -> (entry before the first unapplied change, entry now)
        self.tracker: ChangeTracker[str, Remote] = ChangeTracker()
        # Partial passes as leases change; a full one (against the kernel) every
        # resync_interval, on kernel damage, and to retry a failed pass.
        self.runner = BoundedFrequencyRunner(
            "overlay",
            self._sync,
            0.0,
            self.resync_interval,
            retry_initial=min(1.0, self.resync_interval),
        )
        self._guarded: set[str] | None = None  # the peers the VXLAN guard last accepted
        self.spec = NetworkSpec()
        self.leaser: lease.SubnetLeaser | None = None
        self.underlay: Underlay | None = None
        self.lease: lease.Lease | None = None
        self.vtep_mac = ""
        self.reconciles = 0
        self._unregister_metrics: Any = None

    # ------------------------------------------------------------ helpers

    async def _k(self, fn: Any, *args: Any) -> Any:
        """Run a blocking netlink call on the agent's one netlink thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args)
        )

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

    def _state_path(self) -> str:
        return os.path.join(self.ctx.paths.state_dir, STATE_FILE)

    def _load_state(self) -> dict[str, Any]:
        try:
            with open(self._state_path()) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        write_json_atomic(
            self._state_path(),
            {"subnet": self.lease.subnet if self.lease else None, "vtepMAC": self.vtep_mac},
        )

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        cfg = await config.load(self.store)
        self.spec = cfg.spec
        if self.spec.backend.type != "vxlan":
            raise config.ConfigError(f"backend {self.spec.backend.type!r} is not supported")
        self.underlay = await self._k(
            self.kernel.find_underlay, self.ctx.underlay_iface, self.ctx.underlay_ip
        )
        config.check_underlay(self.spec, [self.underlay.ip])
        if self.mtu > self.underlay.mtu - config.VXLAN_OVERHEAD:
            log.warning(
                "backend.mtu %d is larger than the underlay allows (%d - %d): large "
                "packets will be fragmented or dropped",
                self.mtu,
                self.underlay.mtu,
                config.VXLAN_OVERHEAD,
            )
        state = self._load_state()
        self.vtep_mac = (
            state.get("vtepMAC")
            or await self._k(self.kernel.device_mac, self.device)
            or random_mac()
        )
        self._save_state()
        self.leaser = lease.SubnetLeaser(
            self.store,
            self.ctx.node_name,
            self.underlay.ip,
            self.vtep_mac,
            self.spec,
            ttl=self.lease_ttl,
        )
        await self._adopt(
            await self.leaser.acquire(preferred=state.get("subnet")), previous=state.get("subnet")
        )
        await self._apply_host_settings()
        if self._leases_reg is None:
            self._leases_reg = self.leases.on_change(self._lease_changed)
        self.ctx.informers.start()
        # The handler has seen the initial list, so the pass below covers what it recorded.
        await self._leases_reg.wait_synced()
        await self._start_fastpath()
        await self.reconcile()
        # Pod veth events always (the fast path follows pods by them); damage events
        # (a deleted route, FDB entry...) only repair at once with kernel_events.
        loop = asyncio.get_running_loop()
        self._monitor = EventMonitor(
            self.namespace,
            self.device,
            lambda kind, key: loop.call_soon_threadsafe(self._on_kernel_event, kind, key),
        )
        self._monitor.start(await self._k(self.kernel.link_index, self.device))
        self._unregister_metrics = register_collector(self._fastpath_metrics)
        log.info(
            "overlay ready: node %s subnet %s on %s (%s), %s mtu %d, %d peer(s), %s",
            self.ctx.node_name,
            self.subnet,
            self.underlay.iface,
            self.underlay.ip,
            self.device,
            self.mtu,
            len(self.remotes()),
            "kernel datapath"
            if self.datapath == "kernel"
            else "kernel datapath until the eBPF fast path is loaded",
        )

    async def _start_fastpath(self) -> None:
        """Check that the fast path can load (it loads in run()); datapath=kernel removes it."""
        if self.datapath == "kernel":
            for c in await self._k(fastpath.detach_all, self.kernel.ipr):
                log.info("%s", c)
            self._write_datapath_file()
        elif self.datapath == "bpf" and (why := fastpath.unavailable()):
            raise fastpath.BPFUnavailable(f"datapath bpf: {why} (or use --datapath auto)")

    async def _load_fastpath(self) -> None:
        """Compile and attach the fast path, off the start-up path.

        Compiling takes about a second of CPU; pods need not wait for it: until
        it is done the kernel's path (or a previous run's programs, still
        attached) carries their traffic, and nothing changes on the wire.
        """
        if self.datapath == "kernel":
            return
        fp = fastpath.FastPath(node=self.ctx.node_name)  # pins proxy_endpoints for corral proxy
        try:
            await asyncio.get_running_loop().run_in_executor(None, fp.load)
        except fastpath.BPFUnavailable as e:
            (log.error if self.datapath == "bpf" else log.warning)(
                "eBPF fast path off, the kernel's path carries all pod traffic: %s", e
            )
            self._datapath_why = str(e)
            await self._k(self._write_datapath_file)
            return
        self.fastpath = fp
        for c in await self._k(self._fastpath_pass, True):
            log.info("%s", c)
        await self._k(self._write_datapath_file)
        log.info("eBPF fast path on: %d pod(s), %d peer(s)", fp.pod_count, fp.peer_count)

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
        self.lease = new
        self._save_state()
        await self._ensure_device()
        self._write_subnet_file()
        await self._set_pod_cidr(new.subnet)

    def _write_subnet_file(self) -> None:
        """The contract with the CNI plugin (see docs/overlay.md)."""
        assert self.lease is not None
        write_json_atomic(
            self.ctx.paths.subnet_file,
            {
                "network": self.spec.network,
                "subnet": self.lease.subnet,
                "mtu": self.mtu,
                "ipMasq": self.spec.ip_masq,
                "node": self.ctx.node_name,
            },
        )

    def _write_datapath_file(self) -> None:
        """`<run dir>/datapath.json`: which datapath carries pod traffic, and how much.

        Rewritten by every full pass (10 s), for whoever debugs the node.
        """
        fp = self.fastpath
        doc: dict[str, Any] = {"datapath": "kernel", "why": self._datapath_why}
        if fp is not None:
            doc = {
                "datapath": "bpf",
                "pods": fp.pod_count,
                "peers": fp.peer_count,
                "packets": fp.stats(),
            }
        doc["dropped"] = guard.drops(self.namespace, fp)
        write_json_atomic(os.path.join(self.ctx.paths.run_dir, DATAPATH_FILE), doc)

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
        assert self.underlay is not None
        node = Node(
            metadata={"name": name},
            spec=NodeSpec(pod_cidr=subnet, pod_cidrs=[subnet]),
            status=NodeStatus(
                addresses=[
                    NodeAddress(type="InternalIP", address=self.underlay.ip),
                    NodeAddress(type="Hostname", address=name),
                ]
            ),
        )
        try:
            await self.store.create(node)
        except AlreadyExists:
            await self.store.modify(Node, name, None, change)

    async def _ensure_device(self) -> None:
        assert self.underlay is not None and self.lease is not None
        spec = DeviceSpec(
            name=self.device,
            vni=self.spec.backend.vni,
            port=self.spec.backend.port,
            local_ip=self.underlay.ip,
            underlay_index=self.underlay.index,
            mac=self.vtep_mac,
            mtu=self.mtu,
            subnet=self.lease.subnet,
        )
        for change in await self._k(self.kernel.ensure_device, spec):
            log.info("%s: %s", self.device, change)

    async def _apply_host_settings(self) -> None:
        """Masquerade and conntrack-bypass rules and IPv4 forwarding in the node namespace."""
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(
            None, masq.ensure, self.namespace, self.spec.network, self.spec.ip_masq
        ):
            log.info(
                "masquerade for pods leaving %s: %s",
                self.spec.network,
                "on" if self.spec.ip_masq else "off",
            )
        if await loop.run_in_executor(None, notrack.ensure, self.namespace, self.spec.backend.port):
            log.info("VXLAN packets on UDP port %d skip conntrack", self.spec.backend.port)
        if self.ip_forward:
            await loop.run_in_executor(None, self._enable_forwarding)

    def _enable_forwarding(self) -> None:
        argv = ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]
        subprocess.run(
            netns.command(self.namespace, argv) if self.namespace else argv,
            check=False,
            capture_output=True,
            timeout=30,
        )

    # ------------------------------------------------------------ reconcile

    def _as_remote(self, key: str, rec: SubnetLease | None) -> Remote | None:
        """The data path entry a lease asks for, or None (ours, incomplete, foreign)."""
        if rec is None or not rec.vtep_mac or rec.node_name == self.ctx.node_name:
            return None
        if key != subnet_key(rec.subnet):  # not where the lease for its subnet lives
            return None
        if self.lease is not None and key == self.lease.key:
            return None
        sub = ipaddress.ip_network(rec.subnet)
        if not sub.subnet_of(ipaddress.ip_network(self.spec.network)):  # type: ignore[arg-type]
            return None
        return Remote(rec.subnet, rec.public_ip, rec.vtep_mac.lower())

    def remotes(self) -> list[Remote]:
        """Every other node's lease in this network, as data path entries."""
        out = [r for key, rec in self.leases.items() if (r := self._as_remote(key, rec))]
        return sorted(out, key=lambda r: ipaddress.ip_network(r.subnet))

    async def reconcile(self) -> None:
        """Repair the device and make the per-peer entries match the leases."""
        assert self.underlay is not None
        self.tracker.clear()  # this pass covers them
        await self._ensure_device()
        changes = await self._k(
            self.kernel.sync_remotes,
            self.device,
            self.remotes(),
            self.underlay,
            self.spec.backend.direct_routing,
        )
        for c in changes:
            log.info("%s: %s", self.device, c)
        await self._guard(pods=True)
        if self.fastpath is not None:
            for c in await self._k(self._fastpath_pass, False):
                log.info("%s", c)
        await self._k(self._write_datapath_file)
        self.reconciles += 1

    async def _guard(self, pods: bool) -> None:
        """VXLAN only from peers, none from pods; pods send only from their own address."""
        try:
            await self._apply_guards(pods)
        except Exception as e:  # the rest of the pass (routes, FDB, fast path) goes on
            log.error("cannot apply the overlay's guards (%s: %s); retrying", type(e).__name__, e)
            self._guarded = None

    async def _apply_guards(self, pods: bool) -> None:
        ips = guard.peer_ips(self.remotes())
        if pods or ips != self._guarded:  # a full pass checks the kernel; the watch, changes
            for c in await asyncio.get_running_loop().run_in_executor(
                None, guard.ensure, self.namespace, self.spec.network, self.spec.backend.port, ips
            ):
                log.info("%s", c)
            self._guarded = ips
        if self.fastpath is not None:
            for c in await self._k(self.fastpath.sync_peer_ips, ips):
                log.info("%s", c)
        if pods:
            for c in await self._k(self._guard_pods):
                log.info("%s", c)

    def _guard_pods(self) -> list[str]:
        have = podguard.read(self.namespace)  # first: see podguard.sync
        pods = podguard.pods_from_links(self.kernel.ipr.get_links())
        return podguard.sync(self.namespace, pods, have)

    def _encapsulated(self) -> list[Remote]:
        """The peers reached through VXLAN (not by direct routing)."""
        assert self.underlay is not None
        direct = self.spec.backend.direct_routing
        return [r for r in self.remotes() if not (direct and self.underlay.on_link(r.public_ip))]

    def _fastpath_pass(self, reattach: bool) -> list[str]:
        """Bring the fast path's maps and hooks in line (on the netlink thread)."""
        fp, ul = self.fastpath, self.underlay
        assert fp is not None and ul is not None and self.lease is not None
        index = self.kernel.link_index(self.device)
        if index is None:
            return []  # the device is being repaired; the next pass follows
        want = fastpath.Settings(
            cluster=str(self.spec.network),
            subnet=self.lease.subnet,
            uplink_index=ul.index,
            local_ip=ul.ip,
            vni=self.spec.backend.vni,
            port=self.spec.backend.port,
            vtep_mac=self.vtep_mac,
            device_index=index,
        )
        if fp.settings != want:
            fp.configure(want)
        changes = fp.sync_peer_ips(guard.peer_ips(self.remotes()))  # before from_uplink goes on
        changes += fp.sync_peers(self._encapsulated(), ul.on_link)
        changes += fp.sync_pods(self.kernel.ipr, verify=True)
        changes += fp.attach_all(self.kernel.ipr) if reattach else fp.attach_fixed(self.kernel.ipr)
        return changes

    def _on_kernel_event(self, kind: str, key: str) -> None:
        """Netlink reported a change: if it hit something we want, check everything now.

        Deletions of entries no lease asks for are our own removals; ignoring
        them keeps every lease removal from costing a full pass on every node.
        """
        if kind == "pod":
            self._pod_links.add(int(key))
            self._pods_dirty.set()
            return
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
            log.info("%s: %s %s changed under us; repairing", self.device, kind, key)
        self.runner.run_soon(full=True)

    async def _apply_changes(self) -> None:
        """Program just the leases that changed since the last pass (the watch's fast path)."""
        assert self.underlay is not None
        for old, new in self.tracker.take().values():
            for c in await self._k(
                self.kernel.update_remote,
                self.device,
                old,
                new,
                self.underlay,
                self.spec.backend.direct_routing,
            ):
                log.info("%s: %s", self.device, c)
        if self.fastpath is not None:
            assert self.underlay is not None
            for c in await self._k(
                self.fastpath.sync_peers, self._encapsulated(), self.underlay.on_link
            ):
                log.info("%s", c)
        await self._guard(pods=False)

    async def _resync_config(self) -> None:
        """Pick up ipMasq / directRouting changes; the address plan needs a restart."""
        cfg = await self.store.get(NetworkConfig, config.CONFIG_NAME)
        if cfg is None or cfg.spec == self.spec:
            return
        if config.address_plan(cfg.spec) != config.address_plan(self.spec):
            log.error(
                "the cluster network's address plan changed in etcd; restart this "
                "node's agent to use it (keeping %s until then)",
                self.spec.network,
            )
            return
        self.spec = cfg.spec
        self._write_subnet_file()

    # ------------------------------------------------------------ run

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(c, name=f"overlay-{n}")
            for n, c in (
                ("lease", self._lease_loop()),
                ("reconcile", self.runner.run()),
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

    async def _lease_loop(self) -> None:
        interval = max(self.lease_ttl / 3, 0.5)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_lease.wait(), interval)
            self._check_lease.clear()
            assert self.lease is not None and self.leaser is not None
            try:
                if await self.leaser.renew(self.lease):
                    metrics.LEASE_RENEWALS.labels("ok").inc()
                    continue
            except Exception as e:
                metrics.LEASE_RENEWALS.labels("failed").inc()
                log.warning("cannot renew the subnet lease (%s: %s); retrying", type(e).__name__, e)
                continue
            metrics.LEASE_RENEWALS.labels("lost").inc()
            log.warning(
                "subnet lease for %s was lost (expired or deleted); re-acquiring", self.lease.subnet
            )
            old = self.lease.subnet
            await self._adopt(await self.leaser.acquire(preferred=old), previous=old)
            self.runner.run_soon(full=True)

    def _lease_changed(self, old: SubnetLease | None, new: SubnetLease | None) -> None:
        """A lease came, went or changed: note its data path entry for the next pass."""
        for rec in (old, new):
            if rec is not None and self.lease is not None and rec.subnet == self.lease.subnet:
                self._check_lease.set()
        key = subnet_key((new or old).subnet)  # type: ignore[union-attr]
        if self.tracker.record(key, self._as_remote(key, old), self._as_remote(key, new)):
            self.runner.run_soon()

    async def _pods_loop(self) -> None:
        """A pod veth came, went or changed: update the fast path's pods map and hooks."""
        while True:
            await self._pods_dirty.wait()
            self._pods_dirty.clear()
            links, self._pod_links = self._pod_links, set()
            if self.fastpath is not None:
                try:
                    for c in await self._k(self.fastpath.update_links, self.kernel.ipr, links):
                        log.info("%s", c)
                except Exception:
                    log.exception("fast path pod sync failed; the periodic pass retries")
            try:  # CNI ADD guarded the veth already; this covers veths made by others
                for c in await self._k(self._guard_pods):
                    log.info("%s", c)
            except Exception:
                log.exception("pod guard sync failed; the periodic pass retries")

    async def _sync(self, full: bool) -> None:
        """Changed leases as they come; everything, against the kernel, when `full`."""
        t0 = time.perf_counter()
        try:
            if not full:
                await self._apply_changes()
            else:
                try:
                    await self._resync_config()
                except Exception as e:  # etcd away: the kernel pass needs no etcd
                    log.warning(
                        "cannot re-read the network config (%s: %s); keeping the current one",
                        type(e).__name__,
                        e,
                    )
                await self._apply_host_settings()
                await self.reconcile()
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        metrics.RECONCILE_SECONDS.labels("full" if full else "changes").observe(
            time.perf_counter() - t0
        )

    # ------------------------------------------------------------ stop

    def _fastpath_metrics(self) -> list[Any]:
        """The fast path's packet counters (BPF map, summed over CPUs), read at scrape time."""
        fp = self.fastpath
        if fp is None:
            return []
        return [
            counter_family(
                "corral_fastpath_packets",
                "Packets the eBPF fast path handled since it was loaded, by counter",
                "counter",
                fp.stats(),
            )
        ]

    def ready(self) -> bool:
        return self.lease is not None and self.reconciles > 0

    def debug_state(self) -> dict[str, Any]:
        fp = self.fastpath
        return {
            "subnet": self.lease.subnet if self.lease else None,
            "underlay": {"iface": self.underlay.iface, "ip": self.underlay.ip}
            if self.underlay
            else None,
            "device": self.device,
            "vtepMAC": self.vtep_mac,
            "peers": {
                key: {"node": r.node_name, "publicIP": str(r.public_ip), "vtepMAC": r.vtep_mac}
                for key, r in sorted(self.leases.items())
            },
            "datapath": "bpf" if fp is not None else "kernel",
            "datapathWhy": None if fp is not None else self._datapath_why,
            "fastpathPods": fp.pod_count if fp is not None else 0,
            "reconciles": self.reconciles,
            "mtu": self.mtu if self.underlay else None,
            "underlayMTU": self.underlay.mtu if self.underlay else None,
            "vni": self.spec.backend.vni,
            "port": self.spec.backend.port,
            "directRouting": self.spec.backend.direct_routing,
            "resyncInterval": self.resync_interval,
            "kernelEvents": self.kernel_events,
            **self._kernel_view(),
        }

    def _kernel_view(self) -> dict[str, Any]:
        """What the kernel holds (routes, neighbours, FDB, device, links with their tc
        programs, the fast path's maps), read on the netlink thread for `corral net`."""
        from corral.ebpf.loader import attached
        from corral.node import nodeview

        def read() -> dict[str, Any]:
            ipr = self.kernel.ipr
            view: dict[str, Any] = {
                "kernel": nodeview.overlay(ipr, self.device),
                "links": nodeview.links(ipr, attached),
            }
            if self.fastpath is not None:
                view["fastpathMaps"] = nodeview.fastpath_maps(self.fastpath)
            return view

        try:
            return self._pool.submit(read).result(timeout=5)
        except Exception as e:  # the rest of the dump is still worth having
            return {"kernelError": f"{type(e).__name__}: {e}"}

    def resync(self) -> None:
        """A full repair pass now (the debug socket's `resync`, `corral net check --fix`)."""
        self.runner.run_soon(full=True)

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
        if self.fastpath is not None:  # the attached programs keep working until replaced
            with contextlib.suppress(Exception):
                await self._k(self.fastpath.close)
        with contextlib.suppress(Exception):
            await self._k(self.kernel.close)
        self._pool.shutdown(wait=False)


# ------------------------------------------------------------ standalone entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m corral.overlay.agent",
        description="Run only the overlay part of a corral node.",
    )
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--etcd", default=os.environ.get("CORRAL_ETCD", "http://127.0.0.1:2379"))
    p.add_argument("--state-dir", default=NodePaths.state_dir)
    p.add_argument("--run-dir", default=NodePaths.run_dir)
    p.add_argument("--netns", help="program this network namespace instead of our own")
    p.add_argument("--underlay-iface")
    p.add_argument("--underlay-ip")
    p.add_argument("--resync", type=float, default=10.0, help="seconds between full repairs")
    p.add_argument("--lease-ttl", type=int, default=lease.DEFAULT_TTL)
    p.add_argument(
        "--datapath",
        choices=DATAPATHS,
        default="auto",
        help="pod traffic between nodes: eBPF fast path if it loads (auto), "
        "fast path or fail (bpf), kernel only (kernel)",
    )
    return p


async def _amain(args: argparse.Namespace) -> int:
    store = Store(args.etcd)
    ctx = NodeContext(
        node_name=args.node,
        store=store,
        paths=NodePaths(run_dir=args.run_dir, state_dir=args.state_dir),
        underlay_iface=args.underlay_iface,
        underlay_ip=args.underlay_ip,
        options=NodeOptions(
            netns=args.netns,
            resync_interval=args.resync,
            lease_ttl=args.lease_ttl,
            datapath=args.datapath,
        ),
    )
    from corral.daemon.core import Daemon, Informers  # the one daemon skeleton

    daemon = Daemon("overlay", args.node, store, configure_logging=True)
    daemon.add("informers", Informers(ctx.informers))
    daemon.add("overlay", OverlayAgent(ctx))
    await daemon.run()  # stops on SIGTERM/SIGINT; kernel state and lease stay
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(_amain(args))
    except (ValueError, RuntimeError, StoreError) as e:
        print(f"corral overlay: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
