"""The cluster network configuration: loading, defaults, and the checks a change must pass.

One `NetworkConfig` object named `cluster` holds it. The object model already
refuses inconsistent specs (network overlapping the service CIDR, a subnet
length that leaves fewer than two node subnets); this module adds the checks
that need the cluster's state: a range must not contain a node's own underlay
address, and the address plan (network, subnetLen, subnet range, VNI, port)
cannot change under nodes that hold leases in it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from corral.api.objects import NetworkConfig, NetworkSpec, Node, SubnetLease
from corral.api.store import SUBNETS_PREFIX, AlreadyExists, Store

CONFIG_NAME = "cluster"
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


class ConfigError(ValueError):
    """A network config that cannot be used; the message says why and what to do."""


def kubernetes_service_ip(
    service_cidr: str | ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> str:
    """The `kubernetes` Service's address: the service CIDR's first (kube-apiserver's
    rule). The API servers put the Service there; the ClusterIP allocators never hand
    it out."""
    return str(ipaddress.ip_network(service_cidr).network_address + 1)


def device_name(vni: int) -> str:
    return f"corral.{vni}"


def describe_validation_error(e: ValidationError) -> str:
    """One line per problem, naming the field in its manifest (camelCase) spelling."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_spec(data: dict[str, Any]) -> NetworkSpec:
    """A NetworkSpec from manifest-shaped data; ConfigError with the reasons otherwise."""
    try:
        return NetworkSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def leasable_subnets(spec: NetworkSpec) -> Iterator[ipaddress.IPv4Network]:
    """Node subnets in order, between subnetMin and subnetMax.

    Like flannel, the first subnet of the network is skipped unless subnetMin
    says otherwise: its .0 address is the network address itself.
    """
    net = ipaddress.ip_network(spec.network)
    step = 1 << (32 - spec.subnet_len)
    lo = int(net.network_address) + step
    hi = int(net.broadcast_address) - step + 1
    if spec.subnet_min is not None:
        lo = int(ipaddress.ip_address(spec.subnet_min)) & ~(step - 1)
    if spec.subnet_max is not None:
        hi = int(ipaddress.ip_address(spec.subnet_max)) & ~(step - 1)
    for start in range(lo, hi + 1, step):
        yield ipaddress.ip_network((start, spec.subnet_len))


def check_underlay(spec: NetworkSpec, underlay_ips: Iterable[str]) -> None:
    """Refuse a spec whose pod or service range contains a node's underlay address."""
    net = ipaddress.ip_network(spec.network)
    svc = ipaddress.ip_network(spec.service_cidr)
    for ip in underlay_ips:
        addr = ipaddress.ip_address(ip)
        if addr in net:
            raise ConfigError(
                f"spec.network {net} contains the node address {addr}: traffic to that node "
                "would be routed into the overlay; pick a pod range away from the node network"
            )
        if addr in svc:
            raise ConfigError(
                f"spec.serviceCIDR {svc} contains the node address {addr}; pick a service "
                "range away from the node network"
            )
    if (
        spec.subnet_min is not None
        and spec.subnet_max is not None
        and (ipaddress.ip_address(spec.subnet_min) > ipaddress.ip_address(spec.subnet_max))
    ):
        raise ConfigError(
            f"spec.subnetMin {spec.subnet_min} is above spec.subnetMax {spec.subnet_max}"
        )


def address_plan(spec: NetworkSpec) -> tuple:
    """The fields nodes' kernel state and leases are built from."""
    return (
        spec.network,
        spec.subnet_len,
        spec.subnet_min,
        spec.subnet_max,
        spec.backend.vni,
        spec.backend.port,
        spec.backend.type,
    )


async def load(store: Store) -> NetworkConfig:
    """The cluster's NetworkConfig, created with the defaults if there is none yet."""
    cfg = await store.get(NetworkConfig, CONFIG_NAME)
    if cfg is not None:
        return cfg
    try:
        return await store.create(NetworkConfig(metadata={"name": CONFIG_NAME}))
    except AlreadyExists:
        cfg = await store.get(NetworkConfig, CONFIG_NAME)
        assert cfg is not None
        return cfg


async def known_underlay_ips(store: Store) -> set[str]:
    """Node addresses the cluster knows about: Node InternalIPs and lease public IPs."""
    ips: set[str] = set()
    nodes, _ = await store.list(Node)
    for n in nodes:
        ips.update(a.address for a in n.status.addresses if a.type in ("InternalIP", "ExternalIP"))
    for lease in await list_leases(store):
        ips.add(lease.public_ip)
    return ips


async def list_leases(store: Store) -> list[SubnetLease]:
    kvs, _ = await store.list_raw(SUBNETS_PREFIX)
    out = []
    for kv in kvs:
        try:
            out.append(SubnetLease.model_validate_json(kv.value))
        except ValidationError:
            continue
    return out


async def set_config(store: Store, spec: NetworkSpec) -> tuple[NetworkConfig, bool]:
    """Store `spec` as the cluster config after the cluster-wide checks.

    Returns (config, changed). Raises ConfigError (and stores nothing) when
    the spec contains a node address or changes the address plan while
    nodes hold leases.
    """
    current = await check_config(store, spec)
    if current.spec == spec:
        return current, False
    current.spec = spec
    return await store.update(current), True


async def check_config(store: Store, spec: NetworkSpec) -> NetworkConfig:
    """The cluster-wide checks of set_config, changing nothing; returns the current config."""
    check_underlay(spec, await known_underlay_ips(store))
    current = await load(store)
    if current.spec != spec and address_plan(current.spec) != address_plan(spec):
        leases = await list_leases(store)
        if leases:
            names = ", ".join(sorted(le.node_name for le in leases))
            raise ConfigError(
                f"{len(leases)} node(s) hold subnet leases in the current network ({names}); "
                "network, subnetLen, subnetMin/Max and the backend's vni/port cannot change "
                "under them. Remove those nodes first (`corral node remove NAME`)"
            )
    return current
