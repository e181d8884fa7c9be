"""Service virtual IPs and node ports, allocated once per Service.

Each allocation is an etcd key created only if absent, so two allocators (the
controller and `corral expose`) never hand out the same address:

    /corral/v1/serviceips/<ip>        {"service": "ns/name", "uid": ...}
    /corral/v1/nodeports/<port>       {"service": "ns/name", "uid": ...}

ClusterIPs come from the NetworkConfig `cluster` spec.serviceCIDR (default
10.96.0.0/12), never its network or broadcast address nor the cluster DNS
address (10.96.0.10), which only a Service asking for it by name gets. Node
ports come from 30000-32767. Addresses a user wrote into the Service are
reserved as they are. The controller fills in Services that lack them (e.g.
from `corral apply`) by compare-and-swap and frees what deleted Services held.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
from dataclasses import dataclass

from corral.api.informer import Informer, InformerFactory, started
from corral.api.objects import NetworkConfig, NetworkSpec, Service
from corral.api.store import PREFIX, AlreadyExists, Conflict, NotFound, Store
from corral.control.supervisor import Supervisor
from corral.control.workqueue import WorkQueue, run_worker

log = logging.getLogger(__name__)

CLUSTER_IPS_PREFIX = f"{PREFIX}/serviceips/"
NODE_PORTS_PREFIX = f"{PREFIX}/nodeports/"
NODE_PORT_RANGE = (30000, 32767)


class AllocationError(Exception):
    """No address is free, or the one asked for is taken or out of range."""


@dataclass(frozen=True)
class Holder:
    service: str  # ns/name
    uid: str

    def encode(self) -> bytes:
        return json.dumps({"service": self.service, "uid": self.uid}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Holder:
        try:
            d = json.loads(raw)
            return cls(str(d["service"]), str(d["uid"]))
        except (ValueError, KeyError, TypeError):
            return cls("", "")


async def network_spec(store: Store) -> NetworkSpec:
    cfg = await store.get(NetworkConfig, "cluster")
    return cfg.spec if cfg is not None else NetworkSpec()


class Allocator:
    """Reserves cluster IPs and node ports in etcd for one Service at a time."""

    def __init__(self, store: Store, rng: random.Random | None = None) -> None:
        self.store = store
        self.rng = rng or random.Random()

    async def _holders(self, prefix: str) -> dict[str, Holder]:
        kvs, _ = await self.store.list_raw(prefix)
        return {kv.key.removeprefix(prefix): Holder.decode(kv.value) for kv in kvs}

    async def _claim(self, key: str, holder: Holder) -> bool:
        """Create the key for `holder`; True if it is now theirs (also if it already was)."""
        try:
            await self.store.create_raw(key, holder.encode())
            return True
        except AlreadyExists:
            kv = await self.store.get_raw(key)
            return kv is not None and Holder.decode(kv.value) == holder

    async def cluster_ip(self, svc: Service, holder: Holder) -> str:
        spec = await network_spec(self.store)
        net = ipaddress.ip_network(spec.service_cidr)
        want = svc.spec.cluster_ip
        if want not in (None, ""):
            if ipaddress.ip_address(want) not in net:
                raise AllocationError(f"spec.clusterIP {want} is outside the service CIDR {net}")
            if not await self._claim(CLUSTER_IPS_PREFIX + want, holder):
                raise AllocationError(f"spec.clusterIP {want} is already allocated")
            return want
        held = await self._holders(CLUSTER_IPS_PREFIX)
        mine = [ip for ip, h in held.items() if h == holder]
        if mine:
            return mine[0]  # an earlier attempt for this Service got this far
        size = net.num_addresses
        reserved = {spec.cluster_dns}
        start = self.rng.randrange(1, size - 1)
        for i in range(size - 2):
            ip = str(net.network_address + 1 + (start - 1 + i) % (size - 2))
            if ip in held or ip in reserved:
                continue
            if await self._claim(CLUSTER_IPS_PREFIX + ip, holder):
                return ip
        raise AllocationError(f"the service CIDR {net} has no free address left")

    async def node_ports(self, svc: Service, holder: Holder) -> list[int | None]:
        held = await self._holders(NODE_PORTS_PREFIX)
        mine = sorted(int(p) for p, h in held.items() if h == holder)
        out: list[int | None] = []
        lo, hi = NODE_PORT_RANGE
        for sp in svc.spec.ports:
            if sp.node_port is not None:
                if not await self._claim(f"{NODE_PORTS_PREFIX}{sp.node_port}", holder):
                    raise AllocationError(f"nodePort {sp.node_port} is already allocated")
                out.append(sp.node_port)
                continue
            reuse = next(
                (p for p in mine if p not in out and all(x.node_port != p for x in svc.spec.ports)),
                None,
            )
            if reuse is not None:
                out.append(reuse)
                continue
            start = self.rng.randrange(lo, hi + 1)
            for i in range(hi - lo + 1):
                port = lo + (start - lo + i) % (hi - lo + 1)
                if str(port) in held or port in out:
                    continue
                if await self._claim(f"{NODE_PORTS_PREFIX}{port}", holder):
                    out.append(port)
                    break
            else:
                raise AllocationError(f"no node port is free in {lo}-{hi}")
        return out

    async def fill(self, svc: Service) -> bool:
        """Reserve what `svc` lacks (and what it names) and write it into `svc`.

        Does not save the Service. True if `svc` changed. `metadata.uid` must be set.
        """
        holder = Holder(svc.key_name, svc.metadata.uid or "")
        changed = False
        if svc.spec.type != "ExternalName" and svc.spec.cluster_ip != "None":
            ip = await self.cluster_ip(svc, holder)
            if svc.spec.cluster_ip != ip:
                svc.spec.cluster_ip, svc.spec.cluster_ips, changed = ip, [ip], True
            elif not svc.spec.cluster_ips:
                svc.spec.cluster_ips, changed = [ip], True
        if svc.spec.type in ("NodePort", "LoadBalancer"):
            for sp, port in zip(svc.spec.ports, await self.node_ports(svc, holder), strict=True):
                if sp.node_port != port:
                    sp.node_port, changed = port, True
        return changed

    async def release(self, service_key: str, keep_uid: str | None = None) -> int:
        """Free everything held for `service_key` (except by the Service with `keep_uid`)."""
        n = 0
        for prefix in (CLUSTER_IPS_PREFIX, NODE_PORTS_PREFIX):
            kvs, _ = await self.store.list_raw(prefix)
            for kv in kvs:
                h = Holder.decode(kv.value)
                if h.service == service_key and h.uid != keep_uid:
                    await self.store.delete_raw(kv.key, kv.mod_revision)
                    n += 1
        return n


class ServiceIPController:
    """Gives every Service its ClusterIP and node ports; frees them when it goes."""

    def __init__(
        self, store: Store, seed: int | None = None, informers: InformerFactory | None = None
    ) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.allocator = Allocator(store, random.Random(seed))
        self.queue = WorkQueue()
        self.services: Informer[Service] = self.informers.informer(Service)
        self.services.on_change(lambda old, new: self.queue.add((new or old).key_name))  # type: ignore[union-attr]
        self._warned: dict[str, str] = {}

    async def sync(self, key: str) -> float | None:
        ns, _, name = key.partition("/")
        svc = await self.store.get(Service, name, ns)
        if svc is None:
            if await self.allocator.release(key):
                log.info("freed the addresses of deleted service %s", key)
            return None
        try:
            if not await self.allocator.fill(svc):
                return None
        except AllocationError as e:
            if self._warned.get(key) != str(e):
                log.error("service %s: %s", key, e)
                self._warned[key] = str(e)
            return 30.0
        try:
            await self.store.update(svc)
        except NotFound:
            await self.allocator.release(key)
            return None
        except Conflict:
            return 0.0  # reservations are kept (they name this Service): retry
        self._warned.pop(key, None)
        log.info(
            "service %s: clusterIP %s%s",
            key,
            svc.spec.cluster_ip,
            "".join(f", nodePort {p.node_port}" for p in svc.spec.ports if p.node_port),
        )
        return None

    async def collect_garbage(self) -> None:
        """Free reservations whose Service is gone (deleted while no controller ran)."""
        await self.services.synced.wait()
        live = {(s.key_name, s.metadata.uid) for s in self.services.values()}
        for prefix in (CLUSTER_IPS_PREFIX, NODE_PORTS_PREFIX):
            kvs, _ = await self.store.list_raw(prefix)
            for kv in kvs:
                h = Holder.decode(kv.value)
                if (h.service, h.uid) not in live:
                    ns, _, name = h.service.partition("/")
                    svc = await self.store.get(Service, name, ns) if name else None
                    if svc is None or svc.metadata.uid != h.uid:
                        await self.store.delete_raw(kv.key, kv.mod_revision)

    async def run(self) -> None:
        async with started(self.informers, stop=self._own_informers), Supervisor() as sv:
            sv.start(self.collect_garbage(), "serviceips-gc")
            sv.start(run_worker(self.queue, self.sync, "service-ips"), "serviceips-worker")
            await sv.wait()
