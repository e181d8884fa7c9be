"""What etcd says the network should be: one read of everything `corral net` compares."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from corral.api import netconfig
from corral.api.objects import (
    EndpointSlice,
    IPAllocation,
    Namespace,
    NetworkConfig,
    NetworkPolicy,
    NetworkSpec,
    Node,
    Pod,
    Service,
    SubnetLease,
)
from corral.api.store import PREFIX, SUBNETS_PREFIX, Store
from corral.common.labels import SERVICE_NAME_LABEL
from corral.overlay import lease
from corral.proxy.core import (
    ServiceView,
    service_ports,
    slice_endpoints,
)


@dataclass
class Allocation:
    key: str
    owner_key: str
    alloc: IPAllocation

    @property
    def ip(self) -> str:
        return str(self.alloc.ip)


@dataclass
class ClusterView:
    spec: NetworkSpec
    nodes: dict[str, Node]
    leases: dict[str, SubnetLease]  # subnet -> lease
    pods: list[Pod]
    services: dict[str, Service]  # ns/name -> Service
    slices: dict[str, list[EndpointSlice]]  # ns/name of the service -> its slices
    allocations: list[Allocation] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # owner key -> IP
    namespaces: list[Namespace] = field(default_factory=list)
    policies: list[NetworkPolicy] = field(default_factory=list)

    @property
    def device(self) -> str:
        return netconfig.device_name(self.spec.backend.vni)

    def lease_of(self, node: str) -> SubnetLease | None:
        return next((x for x in self.leases.values() if x.node_name == node), None)

    def lease_for_ip(self, ip: str) -> SubnetLease | None:
        a = ipaddress.ip_address(ip)
        for x in self.leases.values():
            if a in ipaddress.ip_network(x.subnet):
                return x
        return None

    def node_ip(self, node: str) -> str | None:
        n = self.nodes.get(node)
        ip = n.status.address("InternalIP") if n else None
        if ip is None and (x := self.lease_of(node)) is not None:
            ip = str(x.public_ip)
        return ip

    def pod(self, name: str, namespace: str = "default") -> Pod | None:
        if "/" in name:
            namespace, name = name.split("/", 1)
        return next((p for p in self.pods if p.name == name and p.namespace == namespace), None)

    def pod_by_ip(self, ip: str) -> Pod | None:
        return next(
            (p for p in self.pods if p.status.pod_ip == ip and not _finished(p)),
            None,
        )

    def service(self, name: str, namespace: str = "default") -> Service | None:
        if "/" in name:
            namespace, name = name.split("/", 1)
        return self.services.get(f"{namespace}/{name}")

    def service_by_ip(self, ip: str) -> Service | None:
        return next((s for s in self.services.values() if s.spec.cluster_ip == ip), None)

    def view(self, key: str) -> ServiceView | None:
        svc = self.services.get(key)
        if svc is None:
            return None
        ports = service_ports(svc)
        if not ports:
            return None
        eps = slice_endpoints(self.slices.get(key, []))
        return ServiceView(ports, tuple(sorted((k, v) for k, v in eps.items() if v)))

    def views(self) -> dict[str, ServiceView]:
        return {k: v for k in self.services if (v := self.view(k)) is not None}


def _finished(p: Pod) -> bool:
    return p.status.phase in ("Succeeded", "Failed")


async def read(store: Store) -> ClusterView:
    cfg = await store.get(NetworkConfig, netconfig.CONFIG_NAME)
    spec = cfg.spec if cfg is not None else NetworkSpec()
    nodes, _ = await store.list(Node)
    kvs, _ = await store.list_raw(SUBNETS_PREFIX)
    leases = {r.subnet: r for kv in kvs if (r := lease.decode(kv.value)) is not None}
    pods, _ = await store.list(Pod, None)
    services, _ = await store.list(Service, None)
    slices, _ = await store.list(EndpointSlice, None)
    by_svc: dict[str, list[EndpointSlice]] = {}
    for s in slices:
        name = s.metadata.labels.get(SERVICE_NAME_LABEL)
        if name:
            by_svc.setdefault(f"{s.namespace}/{name}", []).append(s)
    namespaces, _ = await store.list(Namespace)
    policies, _ = await store.list(NetworkPolicy, None)
    view = ClusterView(
        namespaces=list(namespaces),
        policies=list(policies),
        spec=spec,
        nodes={n.name: n for n in nodes},
        leases=leases,
        pods=list(pods),
        services={f"{s.namespace}/{s.name}": s for s in services},
        slices=by_svc,
    )
    ipam, _ = await store.list_raw(f"{PREFIX}/ipam/")
    for kv in ipam:
        rest = kv.key[len(PREFIX) + len("/ipam/") :].split("/")
        if len(rest) >= 3 and rest[1] == "ips":
            try:
                a = IPAllocation.model_validate_json(kv.value)
            except ValueError:
                continue
            owner = f"{PREFIX}/ipam/{rest[0]}/owners/{a.container_id}/{a.ifname}"
            view.allocations.append(Allocation(kv.key, owner, a))
        elif len(rest) >= 4 and rest[1] == "owners":
            view.owners[kv.key] = kv.value.decode(errors="replace")
    return view
