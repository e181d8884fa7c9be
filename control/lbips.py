"""LoadBalancer addresses on bare metal: one from a LoadBalancerPool per Service.

MetalLB's controller half (its speaker half, the ARP announcement, is the proxy's:
proxy/announce.py). Every `type: LoadBalancer` Service of corral's class (no
`spec.loadBalancerClass`, or `corral.dev/l2`) gets one address from the pools,
written to `status.loadBalancer.ingress`; `spec.loadBalancerIP` is honoured when it
is in a pool and free (else the Service waits, and the log says why). A Service of
another class is left alone (another implementation owns it). An address no longer
in any pool is taken back and another given; a Service that stops being a
LoadBalancer of ours loses its address. The books are the Services' statuses
themselves (no keys of its own), so a restarted controller reads who holds what
from the informer: one address per Service, never two Services on one address
(the first holder by creation time keeps it).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator

from corral.api.informer import Informer, InformerFactory, started
from corral.api.loadbalancer import ingress_ips, ours, pool_of
from corral.api.objects import LoadBalancerPool, Service
from corral.api.store import Conflict, NotFound, Store
from corral.common.supervisor import Supervisor
from corral.daemon.runner import BoundedFrequencyRunner

log = logging.getLogger(__name__)


def pool_addresses(pool: LoadBalancerPool) -> Iterator[str]:
    """Usable addresses of a pool, in order (no network/broadcast address of a /30 or wider)."""
    for cidr in pool.spec.cidrs:
        net = ipaddress.ip_network(cidr)
        hosts = net.hosts() if net.prefixlen < 31 else iter(net)
        for ip in hosts:
            yield str(ip)


def in_pools(ip: str, pools: list[LoadBalancerPool]) -> bool:
    return pool_of(ip, pools) is not None


def plan(services: list[Service], pools: list[LoadBalancerPool]) -> dict[str, list[str]]:
    """ns/name -> the ingress IPs it should have, for every Service whose status must change."""
    pools = sorted(pools, key=lambda p: p.name)
    # oldest first: on a clash the first holder keeps its address
    order = sorted(services, key=lambda s: (s.metadata.creation_timestamp or "", s.key_name))
    taken: set[str] = set()
    keep: dict[str, str] = {}
    for s in order:
        if not ours(s):
            continue
        have = ingress_ips(s)
        want = s.spec.load_balancer_ip
        if (
            len(have) == 1
            and have[0] not in taken
            and in_pools(have[0], pools)
            and (want is None or want == have[0])
        ):
            keep[s.key_name] = have[0]
            taken.add(have[0])
    out: dict[str, list[str]] = {}
    free = (ip for p in pools for ip in pool_addresses(p))
    # those asking for an address by name before those taking any free one
    for s in sorted(order, key=lambda s: s.spec.load_balancer_ip is None):
        key = s.key_name
        if s.spec.type != "LoadBalancer" and ingress_ips(s):
            out[key] = []  # no longer a LoadBalancer: its address goes
            continue
        if not ours(s) or key in keep:
            continue
        want = s.spec.load_balancer_ip
        ip: str | None = None
        if want is not None:
            if want in taken:
                log.warning("service %s: loadBalancerIP %s is held by another Service", key, want)
            elif not in_pools(want, pools):
                log.warning("service %s: loadBalancerIP %s is in no LoadBalancerPool", key, want)
            else:
                ip = want
        else:
            ip = next((a for a in free if a not in taken), None)
            if ip is None:
                log.warning("service %s: no LoadBalancerPool address is free", key)
        if ip is not None:
            taken.add(ip)
        new = [ip] if ip else []
        if new != ingress_ips(s):
            out[key] = new
    return out


class LoadBalancerIPController:
    def __init__(self, store: Store, informers: InformerFactory | None = None) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own = informers is None
        self.services: Informer[Service] = self.informers.informer(Service)
        self.pools: Informer[LoadBalancerPool] = self.informers.informer(LoadBalancerPool)
        self.runner = BoundedFrequencyRunner(
            "lbips", self._sync, 0.05, 30.0, retry_initial=0.5, run_at_start=True
        )
        self.assigned = 0
        for inf in (self.services, self.pools):
            inf.on_change(lambda old, new: self.runner.run_soon())

    async def _sync(self, full: bool) -> None:
        changes = plan(list(self.services.values()), list(self.pools.values()))
        for key, ips in sorted(changes.items()):
            ns, _, name = key.partition("/")

            def change(svc: Service, ips: list[str] = ips) -> Service | None:
                if ingress_ips(svc) == ips:
                    return None
                svc = svc.model_copy(deep=True)
                svc.status.load_balancer.ingress = [{"ip": ip, "ipMode": "VIP"} for ip in ips]
                return svc

            try:
                await self.store.modify(Service, name, ns, change)
            except (NotFound, Conflict):
                self.runner.run_soon()  # changed meanwhile: the informer brings it
                continue
            self.assigned += 1
            log.info("service %s: loadBalancer ingress %s", key, ", ".join(ips) or "(none)")

    async def run(self) -> None:
        async with started(self.informers, stop=self._own), Supervisor() as sv:
            await self.services.wait_synced()
            await self.pools.wait_synced()
            sv.start(self.runner.run(), "lbips-runner")
            await sv.wait()
