"""Service virtual IPs and node ports, allocated once per Service.

Each allocation is an etcd key created only if absent, so two allocators (the
controller and `corral expose`) never hand out the same address:

    /corral/v1/serviceips/<ip>        {"service": "ns/name", "uid": ...}
    /corral/v1/nodeports/<port>       {"service": "ns/name", "uid": ...}

ClusterIPs come from the NetworkConfig `cluster` spec.serviceCIDR (default
10.96.0.0/12), never its network or broadcast address nor the cluster DNS
address (10.96.0.10) or the first address (10.96.0.1, the API servers' `kubernetes`
Service), which only a Service asking for them by name gets. Node
ports come from 30000-32767, and so does a LoadBalancer Service's
healthCheckNodePort when its externalTrafficPolicy is Local (kube's rule).
Addresses a user wrote into the Service are reserved as they are. The
controller fills in Services that lack them (e.g. from `corral apply`) by
compare-and-swap and frees what deleted Services held.

Two allocators, one bookkeeping rule. `Allocator` (what `corral expose` uses,
once per command) reads the keys and claims one by one. The controller keeps
its books in memory: informers on the Services and on both key prefixes, plus
the claims of its own still in flight. For each Service it picks a free address
from memory and writes, in ONE transaction, the address key (only if absent:
`create == 0`) and the Service (only if unchanged: its mod revision); a batch
of Services goes in one transaction of up to 128 operations. Whatever memory
got wrong (another allocator took the address, the Service changed) fails the
compare, nothing of that transaction is written, and the Service is planned
again alone. So two Services never share an address, a reservation never
outlives a failed write, and no update is lost.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.api.informer import Informer, InformerFactory, started
from corral.api.netconfig import kubernetes_service_ip
from corral.api.objects import NetworkConfig, NetworkSpec, Service
from corral.api.store import PREFIX, AlreadyExists, Store, batched, object_key
from corral.common.supervisor import Supervisor
from corral.control.workqueue import WorkQueue, run_batch_worker

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
        reserved = {spec.cluster_dns, kubernetes_service_ip(net)}
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
            ports = await self.node_ports(svc, holder)
            for sp, port in zip(svc.spec.ports, ports, strict=True):
                if sp.node_port != port:
                    sp.node_port, changed = port, True
            if needs_health_port(svc):
                hc = await self.health_port(svc, holder, {p for p in ports if p})
                if svc.spec.health_check_node_port != hc:
                    svc.spec.health_check_node_port, changed = hc, True
        return changed

    async def health_port(self, svc: Service, holder: Holder, used: set[int]) -> int:
        want = svc.spec.health_check_node_port
        if want is not None:
            if want in used or not await self._claim(f"{NODE_PORTS_PREFIX}{want}", holder):
                raise AllocationError(f"healthCheckNodePort {want} is already allocated")
            return want
        held = await self._holders(NODE_PORTS_PREFIX)
        lo, hi = NODE_PORT_RANGE
        start = self.rng.randrange(lo, hi + 1)
        for i in range(hi - lo + 1):
            port = lo + (start - lo + i) % (hi - lo + 1)
            if str(port) in held or port in used:
                continue
            if await self._claim(f"{NODE_PORTS_PREFIX}{port}", holder):
                return port
        raise AllocationError(f"no node port is free in {lo}-{hi}")

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


def needs_health_port(svc: Service) -> bool:
    return svc.spec.type == "LoadBalancer" and svc.spec.external_traffic_policy == "Local"


def holder_record(raw: bytes) -> Holder:
    """The raw informers' decoder for address keys (one function: informers share it)."""
    return Holder.decode(raw)


BY_HOLDER = "holder"


def by_holder(h: Holder) -> list[str]:
    return [h.service] if h.service else []


class _Pending(dict[str, Holder]):
    """address -> holder, also by service, so `held_by` need not scan every claim."""

    def __init__(self) -> None:
        super().__init__()
        self._by_service: dict[str, set[str]] = {}

    def __setitem__(self, addr: str, h: Holder) -> None:
        old = self.get(addr)
        if old is not None:
            self._by_service.get(old.service, set()).discard(addr)
        super().__setitem__(addr, h)
        self._by_service.setdefault(h.service, set()).add(addr)

    def __delitem__(self, addr: str) -> None:
        h = self[addr]
        super().__delitem__(addr)
        addrs = self._by_service.get(h.service)
        if addrs is not None:
            addrs.discard(addr)
            if not addrs:
                del self._by_service[h.service]

    def of(self, service: str) -> dict[str, Holder]:
        return {a: self[a] for a in self._by_service.get(service, ())}


class AddressBook:
    """Who holds which address: the informer on the keys, plus our claims in flight."""

    def __init__(
        self,
        informer: Informer[Holder],
        prefix: str,
        on_seen: Callable[[Holder], None] | None = None,
    ) -> None:
        self.informer = informer
        self.prefix = prefix
        self.pending = _Pending()  # address -> holder: claimed by us, not seen yet
        self.on_seen = on_seen  # told of each holder whose key arrived (after `pending`)
        informer.add_index(BY_HOLDER, by_holder)
        informer.on_change(self._seen)

    def _seen(self, old: Holder | None, new: Holder | None) -> None:
        for h in (old, new):
            if h is None:
                continue
            for key in self.informer.index_keys(BY_HOLDER, h.service):
                addr = key.removeprefix(self.prefix)
                if self.pending.get(addr) == self.informer.cache.get(key):
                    del self.pending[addr]
        if new is not None and self.on_seen is not None:
            self.on_seen(new)

    def holder(self, addr: str) -> Holder | None:
        return self.pending.get(addr) or self.informer.cache.get(self.prefix + addr)

    def held_by(self, service: str) -> dict[str, Holder]:
        """Every address held under the Service's name (whatever its uid)."""
        out = {
            key.removeprefix(self.prefix): h
            for key in self.informer.index_keys(BY_HOLDER, service)
            if (h := self.informer.cache.get(key)) is not None
        }
        out.update(self.pending.of(service))
        return out

    def revision(self, addr: str) -> int | None:
        return self.informer.revision_of(self.prefix + addr)


@dataclass
class Plan:
    """What one Service needs written: all in one transaction, or none of it."""

    key: str
    compare: list[tuple] = field(default_factory=list)
    ops: list[tuple] = field(default_factory=list)
    claims: list[tuple[AddressBook, str, Holder]] = field(default_factory=list)
    summary: str = ""

    @property
    def size(self) -> int:
        return max(len(self.compare), len(self.ops))

    @property
    def nbytes(self) -> int:
        return sum(len(op[2]) if op[0] == "put" else 0 for op in self.ops) + 64 * len(self.ops)


class ServiceIPController:
    """Gives every Service its ClusterIP and node ports; frees them when it goes."""

    WORKERS = 4  # batch workers on one queue (each holds different Services)
    BATCH = 64  # Services per batch (a few operations each; <= 128 per transaction)

    def __init__(
        self, store: Store, seed: int | None = None, informers: InformerFactory | None = None
    ) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.rng = random.Random(seed)
        self.allocator = Allocator(store, self.rng)
        self.queue = WorkQueue()
        self.services: Informer[Service] = self.informers.informer(Service)
        self.configs: Informer[NetworkConfig] = self.informers.informer(NetworkConfig)
        self.ips = AddressBook(
            self.informers.raw(CLUSTER_IPS_PREFIX, holder_record),
            CLUSTER_IPS_PREFIX,
            self._address_seen,
        )
        self.ports = AddressBook(
            self.informers.raw(NODE_PORTS_PREFIX, holder_record),
            NODE_PORTS_PREFIX,
            self._address_seen,
        )
        self.services.on_change(self._service_changed)
        # ns/name -> uids of Services seen deleted: their keys are freed, also keys
        # that arrive later (a claim made by `corral expose` for a Service not yet
        # written names a uid not in here, so it is left alone).
        self._deleted: dict[str, set[str]] = {}
        self._warned: dict[str, str] = {}
        self.allocated = 0  # Services written with their addresses (for tests and stats)
        self.conflicts = 0  # transactions whose compare failed

    def _address_seen(self, h: Holder) -> None:
        # A key of a Service already deleted (its watch was ahead of this one): free it.
        if h.uid in self._deleted.get(h.service, ()):
            self.queue.add(h.service)

    def _service_changed(self, old: Service | None, new: Service | None) -> None:
        if new is None and old is not None and old.metadata.uid:
            self._deleted.setdefault(old.key_name, set()).add(old.metadata.uid)
        svc = new or old
        if svc is not None:
            self.queue.add(svc.key_name)

    # ---------------------------------------------------------------- planning

    def _spec(self) -> NetworkSpec:
        cfg = self.configs.get("cluster")
        return cfg.spec if cfg is not None else NetworkSpec()

    def _claim(self, plan: Plan, book: AddressBook, addr: str, holder: Holder) -> None:
        key = book.prefix + addr
        book.pending[addr] = holder
        plan.claims.append((book, addr, holder))
        plan.compare.append(("create", key, "==", 0))
        plan.ops.append(("put", key, holder.encode()))

    def _release(self, plan: Plan, book: AddressBook, addr: str) -> None:
        rev = book.revision(addr)
        if rev is not None:
            plan.compare.append(("mod", book.prefix + addr, "==", rev))
            plan.ops.append(("delete", book.prefix + addr))

    def _pick_ip(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network, dns: str) -> str:
        size, first = net.num_addresses, kubernetes_service_ip(net)
        start = self.rng.randrange(1, size - 1)
        for i in range(size - 2):
            ip = str(net.network_address + 1 + (start - 1 + i) % (size - 2))
            if ip != dns and ip != first and self.ips.holder(ip) is None:
                return ip
        raise AllocationError(f"the service CIDR {net} has no free address left")

    def _pick_port(self, taken: set[int]) -> int:
        lo, hi = NODE_PORT_RANGE
        start = self.rng.randrange(lo, hi + 1)
        for i in range(hi - lo + 1):
            port = lo + (start - lo + i) % (hi - lo + 1)
            if port not in taken and self.ports.holder(str(port)) is None:
                return port
        raise AllocationError(f"no node port is free in {lo}-{hi}")

    def plan(self, key: str) -> Plan | None:
        """What `key` needs, from memory; None if nothing. AllocationError if it cannot
        have what it asks for. Claims are marked pending at once, so two plans made
        before either is written never pick the same address."""
        ns, _, name = key.partition("/")
        cached = self.services.get(name, ns)
        plan = Plan(key)
        if cached is None:
            gone = self._deleted.get(key, set())
            for book in (self.ips, self.ports):
                for addr, h in book.held_by(key).items():
                    if h.uid in gone and addr not in book.pending:
                        self._release(plan, book, addr)
            return plan if plan.ops else None
        holder = Holder(key, cached.metadata.uid or "")
        # A copy of what a plan may change (spec, its ports): the cache's object is
        # shared. A deep copy of the whole Service cost ~0.4 ms, a third of a plan.
        spec = cached.spec.model_copy()
        spec.ports = [p.model_copy() for p in cached.spec.ports]
        svc = cached.model_copy(update={"spec": spec})
        changed = False
        try:
            if svc.spec.type != "ExternalName" and svc.spec.cluster_ip != "None":
                changed |= self._plan_ip(plan, svc, holder)
            if svc.spec.type in ("NodePort", "LoadBalancer"):
                changed |= self._plan_ports(plan, svc, holder)
        except AllocationError:
            for book, addr, h in plan.claims:
                if book.pending.get(addr) == h:
                    del book.pending[addr]
            raise
        # Addresses an earlier Service of this name (another uid) held.
        for book in (self.ips, self.ports):
            for addr, h in book.held_by(key).items():
                if h.uid != holder.uid and addr not in book.pending:
                    self._release(plan, book, addr)
        if not plan.ops and not changed:
            return None
        svc_key = object_key(Service, name, ns)
        plan.compare.append(("mod", svc_key, "==", int(cached.metadata.resource_version or 0)))
        if changed:
            plan.ops.append(("put", svc_key, Store.encode(svc)))
        plan.summary = f"clusterIP {svc.spec.cluster_ip}" + "".join(
            f", nodePort {p.node_port}" for p in svc.spec.ports if p.node_port
        )
        if svc.spec.health_check_node_port:
            plan.summary += f", healthCheckNodePort {svc.spec.health_check_node_port}"
        return plan

    def _plan_ip(self, plan: Plan, svc: Service, holder: Holder) -> bool:
        spec = self._spec()
        net = ipaddress.ip_network(spec.service_cidr)
        want = svc.spec.cluster_ip
        if want:
            if ipaddress.ip_address(want) not in net:
                raise AllocationError(f"spec.clusterIP {want} is outside the service CIDR {net}")
            h = self.ips.holder(want)
            if h is None:
                self._claim(plan, self.ips, want, holder)
            elif h != holder:
                raise AllocationError(f"spec.clusterIP {want} is already allocated")
            ip = want
        else:
            mine = sorted(a for a, h in self.ips.held_by(holder.service).items() if h == holder)
            if mine:
                ip = mine[0]  # an earlier attempt for this Service got this far
            else:
                ip = self._pick_ip(net, spec.cluster_dns)
                self._claim(plan, self.ips, ip, holder)
        if svc.spec.cluster_ip != ip or svc.spec.cluster_ips != [ip]:
            svc.spec.cluster_ip, svc.spec.cluster_ips = ip, [ip]
            return True
        return False

    def _plan_ports(self, plan: Plan, svc: Service, holder: Holder) -> bool:
        changed = False
        asked = {p.node_port for p in svc.spec.ports if p.node_port is not None}
        if svc.spec.health_check_node_port is not None:
            asked.add(svc.spec.health_check_node_port)
        mine = sorted(
            int(a)
            for a, h in self.ports.held_by(holder.service).items()
            if h == holder and int(a) not in asked
        )
        used = set(asked)  # the health check port asked for too: no nodePort takes it
        for sp in svc.spec.ports:
            if sp.node_port is not None:
                h = self.ports.holder(str(sp.node_port))
                if h is None:
                    self._claim(plan, self.ports, str(sp.node_port), holder)
                elif h != holder:
                    raise AllocationError(f"nodePort {sp.node_port} is already allocated")
                continue
            if mine:
                port = mine.pop(0)
            else:
                port = self._pick_port(used)
                self._claim(plan, self.ports, str(port), holder)
            used.add(port)
            sp.node_port, changed = port, True
        if needs_health_port(svc):
            want = svc.spec.health_check_node_port
            if want is not None:
                h = self.ports.holder(str(want))
                clash = any(p.node_port == want for p in svc.spec.ports)
                if clash or (h is not None and h != holder):
                    raise AllocationError(f"healthCheckNodePort {want} is already allocated")
                if h is None:
                    self._claim(plan, self.ports, str(want), holder)
            else:
                if mine:
                    port = mine.pop(0)
                else:
                    port = self._pick_port(used)
                    self._claim(plan, self.ports, str(port), holder)
                svc.spec.health_check_node_port, changed = port, True
        return changed

    # ---------------------------------------------------------------- writing

    async def _commit(self, plans: list[Plan]) -> bool:
        compare = [c for p in plans for c in p.compare]
        ops = [o for p in plans for o in p.ops]
        ok, _ = await self.store.txn(compare, ops)
        if not ok:
            self.conflicts += 1
        return ok

    def _unclaim(self, plan: Plan) -> None:
        for book, addr, h in plan.claims:
            if book.pending.get(addr) == h:
                del book.pending[addr]

    async def sync_batch(self, keys: list[str]) -> dict[str, float]:
        """Plan every key from memory, write the plans in batched transactions; a
        batch that fails is written again plan by plan. {key: delay} to look again."""
        again: dict[str, float] = {}
        plans = []
        for key in keys:
            try:
                plan = self.plan(key)
            except AllocationError as e:
                if self._warned.get(key) != str(e):
                    log.error("service %s: %s", key, e)
                    self._warned[key] = str(e)
                again[key] = 30.0
                continue
            if plan is not None:
                plans.append(plan)
        written = []
        for batch in batched(plans, size=lambda p: p.nbytes, ops=lambda p: p.size):
            try:
                ok = await self._commit(batch)
            except BaseException:
                for p in batch:
                    self._unclaim(p)
                raise
            if ok:
                written += batch
                continue
            for p in batch:  # alone: only the plans memory got wrong fail
                try:
                    alone = len(batch) > 1 and await self._commit([p])
                except BaseException:
                    self._unclaim(p)
                    raise
                if alone:
                    written.append(p)
                else:
                    self._unclaim(p)
                    again[p.key] = 0.1  # the informers catch up; plan it again then
        for p in written:
            self._warned.pop(p.key, None)
            if p.summary:
                self.allocated += 1
                log.debug("service %s: %s", p.key, p.summary)
        if written:
            log.info("service addresses written for %d service(s)", len(written))
        return again

    async def collect_garbage(self) -> None:
        """Free reservations whose Service is gone (deleted while no controller ran)."""
        live = {(s.key_name, s.metadata.uid) for s in self.services.values()}
        for book in (self.ips, self.ports):
            for key, h in list(book.informer.items()):
                if (h.service, h.uid) in live:
                    continue
                ns, _, name = h.service.partition("/")
                svc = await self.store.get(Service, name, ns) if name else None
                if svc is None or svc.metadata.uid != h.uid:
                    rev = book.informer.revision_of(key)
                    if rev is not None:
                        await self.store.delete_raw(key, rev)

    async def run(self) -> None:
        async with started(self.informers, stop=self._own_informers), Supervisor() as sv:
            for inf in (self.services, self.configs, self.ips.informer, self.ports.informer):
                await inf.wait_synced()
            sv.start(self.collect_garbage(), "serviceips-gc")
            for i in range(self.WORKERS):
                sv.start(
                    run_batch_worker(self.queue, self.sync_batch, "service-ips", self.BATCH),
                    f"serviceips-worker-{i}",
                )
            await sv.wait()
