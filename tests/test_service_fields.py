"""Service fields corral does not implement are refused at admission, naming the
field and the reason: by the model (pure), `corral apply` and the API server (real
processes, real etcd). Fields it does implement are accepted."""

from __future__ import annotations

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
