"""The `kubernetes` Service and its endpoints, kept by the API servers
(apiserver/kubernetes_service.py), and the ClusterIP allocators leaving its address
alone. Real etcd; the API server in-process."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.api.objects import NetworkConfig, NetworkSpec, Service
from corral.api.store import Store
from corral.apiserver.kubernetes_service import LEASES_PREFIX, KubernetesService
from corral.control.serviceips import AllocationError, Allocator
from tests.apiserver_helpers import Served, served


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path)) as s:
        yield s


async def _eps(api: Served) -> tuple[list[str], list[str]]:
    """(Endpoints addresses, EndpointSlice addresses) of default/kubernetes, via the API."""
    code, ep = await api.request("GET", "/api/v1/namespaces/default/endpoints/kubernetes")
    assert code == 200, ep
    path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes"
    code, sl = await api.request("GET", path)
    assert code == 200, sl
    a = [x["ip"] for sub in ep.get("subsets", []) for x in sub["addresses"]]
    b = [x["addresses"][0] for x in sl.get("endpoints", [])]
    return a, b


async def test_each_server_adds_itself_and_leaves(api: Served, store: Store) -> None:
    one = KubernetesService(store, "127.0.0.1", api.api.port, lease_ttl=5)
    two = KubernetesService(store, "127.0.0.2", api.api.port, lease_ttl=5)
    await one.reconcile()
    code, svc = await api.request("GET", "/api/v1/namespaces/default/services/kubernetes")
    assert code == 200, svc
    assert svc["spec"]["clusterIP"] == "10.96.0.1" and svc["spec"]["clusterIPs"] == ["10.96.0.1"]
    assert svc["spec"]["ports"] == [
        {"name": "https", "protocol": "TCP", "port": 443, "targetPort": api.api.port}
    ]
    assert svc["metadata"]["labels"] == {"component": "apiserver", "provider": "kubernetes"}
    assert await _eps(api) == (["127.0.0.1"], ["127.0.0.1"])
    code, sl = await api.request(
        "GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes"
    )
    assert sl["metadata"]["labels"] == {"kubernetes.io/service-name": "kubernetes"}
    assert sl["ports"] == [{"name": "https", "port": api.api.port, "protocol": "TCP"}]
    assert sl["endpoints"][0]["conditions"]["ready"] is True

    # A second server adds itself; a pass with nothing new writes nothing.
    await two.reconcile()
    assert await _eps(api) == (["127.0.0.1", "127.0.0.2"], ["127.0.0.1", "127.0.0.2"])
    rev = (await store.get(Service, "kubernetes", "default")).metadata.resource_version
    ep_before = await api.request("GET", "/api/v1/namespaces/default/endpoints/kubernetes")
    await one.reconcile()
    await two.reconcile()
    assert (await store.get(Service, "kubernetes", "default")).metadata.resource_version == rev
    ep_after = await api.request("GET", "/api/v1/namespaces/default/endpoints/kubernetes")
    assert ep_after == ep_before

    # One stops: it takes itself out.
    await two.stop()
    assert await _eps(api) == (["127.0.0.1"], ["127.0.0.1"])

    # One dies: its lease expires (revoked here, as etcd does at the TTL) and the other
    # server's next pass drops it.
    await two.reconcile()
    assert await _eps(api) == (["127.0.0.1", "127.0.0.2"], ["127.0.0.1", "127.0.0.2"])
    assert two._lease is not None
    await store.revoke_lease(two._lease)
    assert [kv.key for kv in (await store.list_raw(LEASES_PREFIX))[0]] == [
        LEASES_PREFIX + "127.0.0.1"
    ]
    await one.reconcile()
    assert await _eps(api) == (["127.0.0.1"], ["127.0.0.1"])


async def test_a_deleted_or_changed_service_comes_back(api: Served, store: Store) -> None:
    ks = KubernetesService(store, "127.0.0.1", 6443, lease_ttl=5)
    await ks.reconcile()
    code, _ = await api.request("DELETE", "/api/v1/namespaces/default/services/kubernetes")
    assert code == 200
    patch = {"spec": {"ports": [{"name": "https", "port": 8443, "targetPort": 1}]}}
    await ks.reconcile()
    code, svc = await api.request(
        "PATCH",
        "/api/v1/namespaces/default/services/kubernetes",
        patch,
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert code == 200 and svc["spec"]["ports"][0]["port"] == 8443
    await ks.reconcile()
    svc = await store.get(Service, "kubernetes", "default")
    assert svc is not None and [(p.port, p.target_port) for p in svc.spec.ports] == [(443, 6443)]
    assert svc.spec.cluster_ip == "10.96.0.1"


async def test_service_cidr_from_the_network_config(api: Served, store: Store) -> None:
    spec = NetworkSpec.model_validate({"serviceCIDR": "10.100.0.0/24", "clusterDNS": "10.100.0.10"})
    await store.create(NetworkConfig(metadata={"name": "cluster"}, spec=spec))
    await KubernetesService(store, "127.0.0.1", 6443).reconcile()
    svc = await store.get(Service, "kubernetes", "default")
    assert svc is not None and svc.spec.cluster_ip == "10.100.0.1"


async def test_allocator_never_hands_out_the_first_address(store: Store) -> None:
    spec = NetworkSpec.model_validate({"serviceCIDR": "10.96.0.0/29", "clusterDNS": "10.96.0.6"})
    await store.create(NetworkConfig(metadata={"name": "cluster"}, spec=spec))
    alloc = Allocator(store)
    got = []
    for i in range(4):
        svc = Service.model_validate(
            {"metadata": {"name": f"s{i}", "uid": f"u{i}"}, "spec": {"ports": [{"port": 80}]}}
        )
        await alloc.fill(svc)
        got.append(svc.spec.cluster_ip)
    assert sorted(got, key=ipaddress.ip_address) == [f"10.96.0.{i}" for i in (2, 3, 4, 5)]
    last = Service.model_validate(
        {"metadata": {"name": "s9", "uid": "u9"}, "spec": {"ports": [{"port": 80}]}}
    )
    with pytest.raises(AllocationError):
        await alloc.fill(last)
