"""The `kubernetes` Service in `default` and its endpoints, kept by the API servers
themselves (kube-apiserver's bootstrap controller and its `lease` endpoint reconciler).

Each API server holds a key `/corral/v1/apiserverleases/<ip>` on an etcd lease of
`lease_ttl` seconds, refreshed every third of it. Every pass it makes sure the Service
exists (clusterIP: the first address of the NetworkConfig's service CIDR, port 443
`https` to the servers' port) and writes Endpoints and the EndpointSlice `kubernetes`
with the addresses of the live leases, only when they differ. A server that stops
takes its key out and writes the endpoints without itself; one that dies drops out
when its lease expires and another server's next pass runs. In-cluster clients then
find the API at https://kubernetes.default.svc, as everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from typing import Any

from corral.api.netconfig import kubernetes_service_ip
from corral.api.objects import (
    Endpoint,
    EndpointAddress,
    EndpointConditions,
    EndpointPort,
    Endpoints,
    EndpointSlice,
    EndpointSubset,
    NetworkConfig,
    NetworkSpec,
    ObjectMeta,
    Service,
    ServicePort,
    ServiceSpec,
    TypedObject,
)
from corral.api.store import PREFIX, AlreadyExists, Conflict, Store, StoreError
from corral.common.labels import SERVICE_NAME_LABEL

log = logging.getLogger(__name__)

NAME, NAMESPACE = "kubernetes", "default"
LEASES_PREFIX = f"{PREFIX}/apiserverleases/"
LABELS = {"component": "apiserver", "provider": "kubernetes"}


def want_service(spec: NetworkSpec, port: int) -> Service:
    ip = kubernetes_service_ip(spec.service_cidr)
    return Service(
        metadata=ObjectMeta(name=NAME, namespace=NAMESPACE, labels=dict(LABELS)),
        spec=ServiceSpec(
            type="ClusterIP",
            ports=[ServicePort(name="https", port=443, protocol="TCP", target_port=port)],
            cluster_ip=ip,
            cluster_ips=[ip],
        ),
    )


def want_endpoints(ips: list[str], port: int) -> tuple[Endpoints, EndpointSlice]:
    ports = [EndpointPort(name="https", port=port, protocol="TCP")]
    eps = Endpoints(
        metadata=ObjectMeta(name=NAME, namespace=NAMESPACE, labels={}),
        subsets=(
            [EndpointSubset(addresses=[EndpointAddress(ip=ip) for ip in ips], ports=ports)]
            if ips
            else []
        ),
    )
    sl = EndpointSlice(
        metadata=ObjectMeta(name=NAME, namespace=NAMESPACE, labels={SERVICE_NAME_LABEL: NAME}),
        address_type="IPv4",
        endpoints=[
            Endpoint(
                addresses=[ip],
                conditions=EndpointConditions(ready=True, serving=True, terminating=False),
            )
            for ip in ips
        ],
        ports=ports,
    )
    return eps, sl


def _content(obj: TypedObject) -> dict[str, Any]:
    d = obj.dump()
    md = d.pop("metadata", {})
    d["labels"] = md.get("labels", {})
    return d


class KubernetesService:
    """One API server's part: its lease, the Service, the endpoints (a component)."""

    def __init__(
        self,
        store: Store,
        advertise_ip: str,
        port: int,
        *,
        lease_ttl: int = 15,
    ) -> None:
        self.store = store
        self.ip, self.port = advertise_ip, port
        self.lease_ttl = lease_ttl
        self.interval = max(lease_ttl / 3, 0.2)
        self._lease: int | None = None
        self.passes = 0
        self.endpoints: list[str] = []

    @property
    def lease_key(self) -> str:
        return LEASES_PREFIX + self.ip

    async def _spec(self) -> NetworkSpec:
        cfg = await self.store.get(NetworkConfig, "cluster")
        return cfg.spec if cfg is not None else NetworkSpec()

    async def _hold_lease(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(StoreError):
                if await self.store.refresh_lease(self._lease) > 0:
                    return
        self._lease = await self.store.grant_lease(self.lease_ttl)
        value = json.dumps({"ip": self.ip, "port": self.port}).encode()
        await self.store.put_raw(self.lease_key, value, lease=self._lease)

    async def _live(self) -> list[str]:
        kvs, _ = await self.store.list_raw(LEASES_PREFIX)
        ips = [kv.key.removeprefix(LEASES_PREFIX) for kv in kvs]
        return sorted(ips, key=ipaddress.ip_address)

    async def _ensure(self, want: TypedObject) -> bool:
        """Create `want`, or update the stored one when its content differs."""
        kind = type(want)
        have = await self.store.get(kind, want.name, want.namespace)
        if have is None:
            try:
                await self.store.create(want)
                return True
            except AlreadyExists:
                return False  # another server made it: the next pass compares
        if _content(have) == _content(want):
            return False
        want.metadata = have.metadata.model_copy(update={"labels": want.metadata.labels})
        if isinstance(want, Service) and isinstance(have, Service):
            want.status = have.status
        with contextlib.suppress(Conflict):
            await self.store.update(want)
            return True
        return False

    async def _service(self) -> None:
        spec = await self._spec()
        want = want_service(spec, self.port)
        have = await self.store.get(Service, NAME, NAMESPACE)
        if have is not None and have.spec.cluster_ip != want.spec.cluster_ip:
            # kube-apiserver keeps a `kubernetes` Service whose address it did not pick
            # (the CIDR changed): its address is immutable. Only ports are repaired.
            want.spec.cluster_ip, want.spec.cluster_ips = (
                have.spec.cluster_ip,
                have.spec.cluster_ips,
            )
        await self._ensure(want)

    async def _endpoints(self, ips: list[str]) -> None:
        eps, sl = want_endpoints(ips, self.port)
        await self._ensure(eps)
        await self._ensure(sl)
        self.endpoints = ips

    async def reconcile(self) -> None:
        """One pass: lease, Service, endpoints."""
        await self._hold_lease()
        await self._service()
        await self._endpoints(await self._live())
        self.passes += 1

    # ------------------------------------------------------------ component

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except StoreError as e:
                log.warning("the kubernetes Service or its endpoints: %s", e)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Leave the endpoints (kube-apiserver's RemoveEndpoints on shutdown)."""
        with contextlib.suppress(StoreError, OSError, TimeoutError):
            await self.store.delete_raw(self.lease_key)
            if self._lease is not None:
                await self.store.revoke_lease(self._lease)
            self._lease = None
            await self._endpoints([ip for ip in await self._live() if ip != self.ip])

    def ready(self) -> bool:
        return self.passes > 0

    def debug_state(self) -> dict[str, Any]:
        return {"advertise": f"{self.ip}:{self.port}", "endpoints": self.endpoints}
