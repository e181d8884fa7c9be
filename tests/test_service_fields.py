"""Service fields corral does not implement are refused at admission, naming the
field and the reason: by the model (pure), `corral apply` and the API server (real
processes, real etcd). Fields it does implement are accepted."""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from corral.api.objects import Service
from corral.api.store import Store
from corral.apiserver.errors import causes_of
from tests.apiserver_helpers import Served, served


def svc(name: str = "web", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], **spec},
    }


# (spec fields, the field the refusal names, words of the reason)
REFUSED = [
    ({"ipFamilies": ["IPv6"]}, "spec.ipFamilies", "IPv4-only"),
    ({"ipFamilies": ["IPv4", "IPv6"]}, "spec.ipFamilies", "no dual-stack"),
    ({"ipFamilyPolicy": "RequireDualStack"}, "spec.ipFamilyPolicy", "dual-stack"),
    ({"clusterIPs": ["10.96.0.50", "fd00::50"]}, "spec.clusterIPs", "IPv4-only"),
    ({"externalIPs": ["fd00::1"]}, "spec.externalIPs", "IPv4-only"),
    ({"sessionAffinity": "Cookie"}, "spec.sessionAffinity", "'None' or 'ClientIP'"),
    ({"externalTrafficPolicy": "Global", "type": "NodePort"}, "spec.externalTrafficPolicy",
     "'Cluster' or 'Local'"),
    ({"internalTrafficPolicy": "Zone"}, "spec.internalTrafficPolicy", "'Cluster' or 'Local'"),
    ({"externalTrafficPolicy": "Local"}, "spec", "spec.externalTrafficPolicy may only be set"),
    ({"type": "NodePort", "healthCheckNodePort": 30999}, "spec",
     "spec.healthCheckNodePort may only be set when type is LoadBalancer"),
    ({"loadBalancerClass": "corral.dev/l2"}, "spec", "spec.loadBalancerClass may only be set"),
    ({"loadBalancerIP": "10.235.0.9"}, "spec", "spec.loadBalancerIP may only be set"),
    ({"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"]},
     "spec.loadBalancerSourceRanges", "does not filter"),
    ({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": False},
     "spec.allocateLoadBalancerNodePorts", "always get node ports"),
]  # fmt: skip

ACCEPTED = [
    {"ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"},
    {"ipFamilyPolicy": "PreferDualStack"},
    {"internalTrafficPolicy": "Local"},
    {"externalIPs": ["10.235.0.77"], "externalTrafficPolicy": "Local"},
    {"type": "NodePort", "externalTrafficPolicy": "Local"},
    {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 31999,
     "loadBalancerIP": "10.235.0.200", "loadBalancerClass": "corral.dev/l2"},
    {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": True},
    {"trafficDistribution": "PreferClose"},
]  # fmt: skip

IDS = [f"{next(iter(spec))}={next(iter(spec.values()))}" for spec, _, _ in REFUSED]


@pytest.mark.parametrize(("spec", "field", "words"), REFUSED, ids=IDS)
def test_the_model_refuses_with_the_field_and_reason(
    spec: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as e:
        Service.model_validate(svc(**spec))
    causes = causes_of(e.value)
    assert any(f == field and words in m for f, m in causes), causes


@pytest.mark.parametrize("spec", ACCEPTED, ids=str)
def test_what_corral_implements_is_accepted(spec: dict[str, Any]) -> None:
    Service.model_validate(svc(**spec))


def test_health_check_port_goes_with_the_local_policy() -> None:
    """kube's update rule: a LoadBalancer switched to Cluster loses its health check port."""
    d = svc(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=31999)
    assert Service.model_validate(d).spec.health_check_node_port == 31999
    d = copy.deepcopy(d)
    d["spec"]["externalTrafficPolicy"] = "Cluster"
    assert Service.model_validate(d).spec.health_check_node_port is None


# ------------------------------------------------------------ the CLI


@pytest.fixture
def corral(etcd: Any, store: Store, tmp_path: Path) -> Any:
    env = dict(os.environ, CORRAL_ETCD=etcd.url, CORRAL_STATE_DIR=str(tmp_path / "state"))

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=env, input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    return run


CLI_CASES = [REFUSED[0], REFUSED[2], REFUSED[5], REFUSED[-2]]


def test_corral_apply_refuses_and_stores_nothing(corral: Any) -> None:
    for spec, field, words in CLI_CASES:
        r = corral("apply", "-f", "-", stdin=yaml.safe_dump(svc("refused", **spec)))
        assert r.returncode == 1, (spec, r.stdout)
        assert "Traceback" not in r.stderr
        assert field in r.stderr and words in r.stderr, (spec, r.stderr)
    assert corral("get", "svc").stderr.startswith("No resources found")


def test_corral_expose_refuses_a_session_affinity_it_lacks(corral: Any) -> None:
    r = corral("expose", "pod/x", "--port", "80", "--session-affinity", "Cookie")
    assert r.returncode != 0 and "invalid choice: 'Cookie'" in r.stderr, r.stderr


# ------------------------------------------------------------ the API server


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path)) as s:
        yield s


async def test_the_api_server_answers_422_naming_the_field(api: Served, store: Store) -> None:
    base = "/api/v1/namespaces/default/services"
    for i, (spec, field, words) in enumerate(REFUSED):
        status, body = await api.request("POST", base, svc(f"refused-{i}", **spec))
        assert (status, body["reason"]) == (422, "Invalid"), (spec, body)
        causes = [(c["field"], c["message"]) for c in body["details"]["causes"]]
        assert any(f == field and words in m for f, m in causes), (spec, causes)
        assert words in body["message"]
    objs, _ = await store.list(Service, "default")
    assert not [s for s in objs if s.name.startswith("refused-")]
    # an accepted one, then an update to a refused value: refused, the stored one kept
    status, body = await api.request("POST", base, svc("kept", type="NodePort"))
    assert status == 201, body
    body["spec"]["ipFamilies"] = ["IPv6"]
    status, bad = await api.request("PUT", f"{base}/kept", body)
    assert status == 422 and bad["details"]["causes"][0]["field"] == "spec.ipFamilies", bad
    kept = await store.get(Service, "kept", "default")
    assert kept is not None and kept.spec.ip_families != ["IPv6"]
    await store.delete(Service, "kept", "default")


# ------------------------------------------------------------ healthCheckNodePort


async def test_health_check_node_port_is_allocated_for_loadbalancer_local(store: Store) -> None:
    from corral.control.serviceips import NODE_PORTS_PREFIX, ServiceIPController
    from tests.control_helpers import eventually, running

    local = Service.model_validate(svc("lb-local", type="LoadBalancer",
                                       externalTrafficPolicy="Local"))  # fmt: skip
    cluster = Service.model_validate(svc("lb-cluster", type="LoadBalancer"))
    asked = Service.model_validate(
        svc(
            "lb-asked",
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=31777,
        )
    )
    for s in (local, cluster, asked):
        await store.create(s)
    try:
        async with running(ServiceIPController(store, seed=5).run()):

            async def done() -> dict[str, Service] | None:
                got = {n: await store.get(Service, n, "default") for n in
                       ("lb-local", "lb-cluster", "lb-asked")}  # fmt: skip
                if all(s and s.spec.ports[0].node_port for s in got.values()):
                    return got  # type: ignore[return-value]
                return None

            got = await eventually(done, what="node ports")
            hc = got["lb-local"].spec.health_check_node_port
            assert hc is not None and 30000 <= hc <= 32767
            assert hc != got["lb-local"].spec.ports[0].node_port
            assert got["lb-cluster"].spec.health_check_node_port is None
            assert got["lb-asked"].spec.health_check_node_port == 31777
            held = {kv.key for kv in (await store.list_raw(NODE_PORTS_PREFIX))[0]}
            assert {f"{NODE_PORTS_PREFIX}{hc}", f"{NODE_PORTS_PREFIX}31777"} <= held
    finally:
        for n in ("lb-local", "lb-cluster", "lb-asked"):
            await store.delete(Service, n, "default")


async def test_health_servers_answer_like_kube_proxy() -> None:
    """200 with the count where the node has local endpoints, 503 with 0 where not."""
    import json
    import socket

    from corral.proxy.core import EndpointInfo, ServicePort, ServiceView
    from corral.proxy.healthcheck import HealthServers

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    p1, p2 = free_port(), free_port()
    sp1 = ServicePort("default/a", "", "TCP", "10.96.0.1", 80, 30001, external_local=True,
                      health_check_node_port=p1)  # fmt: skip
    sp2 = ServicePort("default/b", "", "TCP", "10.96.0.2", 80, 30002, external_local=True,
                      health_check_node_port=p2)  # fmt: skip
    eps1 = (EndpointInfo("10.244.1.2", 80, local=True), EndpointInfo("10.244.1.3", 80, local=True),
            EndpointInfo("10.244.2.2", 80))  # fmt: skip
    eps2 = (EndpointInfo("10.244.2.3", 80),)
    views = {
        "default/a": ServiceView((sp1,), ((sp1.key, eps1),)),
        "default/b": ServiceView((sp2,), ((sp2.key, eps2),)),
    }
    hs = HealthServers("127.0.0.1")

    async def get(port: int) -> tuple[int, dict[str, Any]]:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await r.read()
        w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    try:
        await hs.sync(views)
        want = {"service": {"namespace": "default", "name": "a"}, "localEndpoints": 2}
        assert await get(p1) == (200, {**want, "serviceProxyHealthy": True})
        status, body = await get(p2)
        assert (status, body["localEndpoints"]) == (503, 0)
        await hs.sync({"default/a": views["default/a"]})  # b gone: its listener closes
        with pytest.raises(OSError):
            await get(p2)
    finally:
        hs.close()


# ------------------------------------------------------------ LoadBalancer: allocation, election


def _lb(name: str, created: str, ingress: list[str] | None = None, **spec: Any) -> Service:
    s = Service.model_validate(svc(name, type="LoadBalancer", **spec))
    s.metadata.namespace = "default"
    s.metadata.creation_timestamp = created
    s.status.load_balancer.ingress = [{"ip": ip} for ip in ingress or []]
    return s


def test_lb_addresses_from_the_pool_honouring_ip_and_class() -> None:
    from corral.api.objects import LoadBalancerPool
    from corral.control.lbips import plan

    pool = LoadBalancerPool(metadata={"name": "p"}, spec={"cidrs": ["10.235.0.200/30"]})
    a = _lb("a", "2026-01-01T00:00:01Z")
    b = _lb("b", "2026-01-01T00:00:02Z", loadBalancerIP="10.235.0.201")
    other = _lb("c", "2026-01-01T00:00:03Z", loadBalancerClass="example.com/other")
    far = _lb("d", "2026-01-01T00:00:04Z", loadBalancerIP="10.9.9.9")
    got = plan([a, b, other, far], [pool])
    # /30: .201 and .202 usable; b asked for .201, so a gets .202; c is not ours; d waits
    assert got == {"default/a": ["10.235.0.202"], "default/b": ["10.235.0.201"]}
    # held addresses are kept; a clash goes to the older holder, the younger one moves
    a2 = _lb("a", "2026-01-01T00:00:01Z", ["10.235.0.202"])
    e = _lb("e", "2026-01-01T00:00:05Z", ["10.235.0.202"])
    assert plan([a2, e], [pool]) == {"default/e": ["10.235.0.201"]}
    # a pool shrinks away from an address: given another; a type change: address gone
    moved = _lb("a", "2026-01-01T00:00:01Z", ["10.1.1.1"])
    assert plan([moved], [pool]) == {"default/a": ["10.235.0.201"]}
    np = Service.model_validate(svc("n", type="NodePort"))
    np.status.load_balancer.ingress = [{"ip": "10.235.0.201"}]
    assert plan([np], [pool]) == {"default/n": []}
    # the pool runs out: the rest wait
    many = [_lb(f"m{i}", f"2026-01-01T00:00:0{i}Z") for i in range(3)]
    assert len(plan(many, [pool])) == 2


def test_election_picks_one_node_and_moves_only_the_lost_nodes_addresses() -> None:
    from corral.proxy.announce import elect, garp_frames

    nodes = ["n1", "n2", "n3"]
    ips = [f"10.235.0.{i}" for i in range(200, 240)]
    first = {ip: elect(ip, nodes) for ip in ips}
    assert set(first.values()) == set(nodes)  # spread over the nodes
    lost = "n2"
    after = {ip: elect(ip, [n for n in nodes if n != lost]) for ip in ips}
    assert all(after[ip] == first[ip] for ip in ips if first[ip] != lost)
    assert all(after[ip] != lost for ip in ips)
    assert elect("10.235.0.200", []) is None
    req, rep = garp_frames("10.235.0.200", bytes.fromhex("020000000001"))
    assert len(req) == 42 and req[12:14] == b"\x08\x06" and req[:6] == b"\xff" * 6
    # sender and target protocol address are both the announced one
    assert req[28:32] == req[38:42] == bytes([10, 235, 0, 200]) and rep[21] == 2


def test_expose_type_loadbalancer_and_external_ip_column(corral: Any) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "lbpod", "labels": {"app": "lbpod"}},
           "spec": {"containers": [{"name": "c", "command": ["sleep", "9"],
                                    "ports": [{"containerPort": 8080}]}]}}  # fmt: skip
    assert corral("apply", "-f", "-", stdin=yaml.safe_dump(pod)).returncode == 0
    r = corral("expose", "pod/lbpod", "--port", "80", "--type", "LoadBalancer")
    assert r.returncode == 0 and "nodePort" in r.stdout, r.stderr
    rows = corral("get", "svc", "lbpod").stdout.splitlines()
    assert rows[0].split()[:4] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP"]
    assert rows[1].split()[1] == "LoadBalancer" and rows[1].split()[3] == "<pending>", rows
    corral("delete", "svc", "lbpod")
    corral("delete", "pod", "lbpod")


def test_lb_pool_flag_is_checked_against_the_underlay() -> None:
    from corral.cluster.local import ClusterError
    from corral.cluster.plan import check_lb_pool

    nodes = ["10.235.0.1", "10.235.0.2"]
    check_lb_pool("10.235.0.224/28", "10.235.0.0/24", nodes, "10.235.0.254")
    for bad, words in (("10.9.0.0/28", "inside the underlay"), ("10.235.0.0/28", "10.235.0.1"),
                       ("10.235.0.240/28", "10.235.0.254"), ("nope", "not a CIDR")):  # fmt: skip
        with pytest.raises(ClusterError, match=words):
            check_lb_pool(bad, "10.235.0.0/24", nodes, "10.235.0.254")
