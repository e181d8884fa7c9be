"""The volume and env logic without a node: the kubelet's atomic writer on a temp dir,
payloads, the downward API's formats and $(VAR) expansion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.api.objects import ConfigMap, Pod, Secret
from corral.runtime import envvars, volumes
from corral.runtime.downward import PodFacts, field_value, format_map, resource_value


def _pod(spec: dict, **meta: object) -> Pod:
    md = {"name": "p", "namespace": "ns", "uid": "u-1", **meta}
    return Pod.model_validate({"metadata": md, "spec": spec})


def test_atomic_writer_swaps_data_and_keeps_names_as_links(tmp_path: Path) -> None:
    t = str(tmp_path)
    assert volumes.write_atomic(t, {"a": (b"1", 0o644), "d/b": (b"2", 0o400)})
    assert sorted(n for n in os.listdir(t) if not n.startswith("..2")) == ["..data", "a", "d"]
    assert os.readlink(tmp_path / "a") == "..data/a"
    assert (tmp_path / "d" / "b").read_bytes() == b"2"
    assert oct((tmp_path / "d" / "b").stat().st_mode & 0o777) == "0o400"
    first = os.readlink(tmp_path / "..data")
    assert not volumes.write_atomic(t, {"a": (b"1", 0o644), "d/b": (b"2", 0o400)})  # same
    assert os.readlink(tmp_path / "..data") == first
    assert volumes.write_atomic(t, {"a": (b"one", 0o644)})
    second = os.readlink(tmp_path / "..data")
    assert second != first and not (tmp_path / first).exists()  # the old set is gone
    assert (tmp_path / "a").read_bytes() == b"one"
    assert not os.path.lexists(tmp_path / "d")  # a key that went away
    assert [n for n in os.listdir(t) if n.startswith("..2")] == [second]


def test_payloads_and_their_errors() -> None:
    cm = ConfigMap.model_validate(
        {"metadata": {"name": "c", "namespace": "ns"}, "data": {"k": "v"}}
    )
    sec = Secret.model_validate(
        {"metadata": {"name": "s", "namespace": "ns"}, "data": {"x": "eQ=="}}
    )
    pod = _pod(
        {
            "containers": [{"name": "c", "command": ["true"]}],
            "volumes": [
                {
                    "name": "a",
                    "configMap": {"name": "c", "items": [{"key": "k", "path": "f", "mode": 0o600}]},
                },
                {"name": "b", "configMap": {"name": "c", "items": [{"key": "nope", "path": "f"}]}},
                {"name": "c", "secret": {"secretName": "gone"}},
                {
                    "name": "d",
                    "projected": {
                        "sources": [
                            {"secret": {"name": "s"}},
                            {"serviceAccountToken": {"path": "t"}},
                        ]
                    },
                },
            ],
        }
    )
    facts = PodFacts(pod, "n1", "10.244.1.5", "10.0.0.1")

    def cms(ns: str, name: str) -> ConfigMap | None:
        return cm if (ns, name) == ("ns", "c") else None

    def secs(ns: str, name: str) -> Secret | None:
        return sec if (ns, name) == ("ns", "s") else None

    a, b, c, d = pod.spec.volumes
    assert volumes.payload(a, facts, cms, secs) == {"f": (b"v", 0o600)}
    with pytest.raises(volumes.VolumeError, match="non-existent config key: nope"):
        volumes.payload(b, facts, cms, secs)
    with pytest.raises(volumes.VolumeError, match='secret "gone" not found'):
        volumes.payload(c, facts, cms, secs)
    with pytest.raises(volumes.VolumeError, match="serviceAccountToken"):
        volumes.payload(d, facts, cms, secs)
    assert volumes.references(pod) == {("ConfigMap", "c"), ("Secret", "gone"), ("Secret", "s")}


def test_downward_values() -> None:
    pod = _pod(
        {
            "containers": [
                {
                    "name": "c",
                    "command": ["true"],
                    "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
                }
            ]
        },
        labels={"app": "web", "tier": "a"},
        annotations={"note": 'say "hi"\n'},
    )
    f = PodFacts(pod, "n1", "10.244.1.5", "10.0.0.1")
    assert field_value(f, "metadata.labels") == 'app="web"\ntier="a"\n'
    assert format_map(pod.metadata.annotations) == 'note="say \\"hi\\"\\n"\n'
    assert field_value(f, "metadata.annotations['note']") == 'say "hi"\n'
    assert field_value(f, "metadata.labels['missing']") == ""
    assert field_value(f, "status.podIP") == "10.244.1.5"
    c = pod.spec.containers[0]
    assert resource_value(c, "limits.cpu", None) == "2"  # rounded up, as the kubelet
    assert resource_value(c, "limits.cpu", "1m") == "1500"
    assert resource_value(c, "limits.memory", "1Mi") == "1024"
    assert resource_value(c, "requests.memory", None) == "0"


def test_expansion_as_kubernetes_does() -> None:
    env = {"A": "x"}
    assert envvars.expand("$(A)-$(B)-$$(A)-$", env) == "x-$(B)-$(A)-$"
    assert envvars.expand("$(A", env) == "$(A"


def test_service_links_are_kubelets_variables() -> None:
    from corral.api.objects import Service
    from corral.runtime.envvars import service_links

    svc = Service.model_validate(
        {
            "metadata": {"name": "my-db"},
            "spec": {
                "clusterIP": "10.96.3.4",
                "ports": [
                    {"name": "sql", "port": 5432},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                ],
            },
        }
    )
    headless = Service.model_validate(
        {"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
    )
    env = service_links([svc, headless])
    assert env["MY_DB_SERVICE_HOST"] == "10.96.3.4"
    assert env["MY_DB_SERVICE_PORT"] == "5432" and env["MY_DB_SERVICE_PORT_SQL"] == "5432"
    assert env["MY_DB_PORT"] == "tcp://10.96.3.4:5432"
    assert env["MY_DB_PORT_53_UDP"] == "udp://10.96.3.4:53"
    assert env["MY_DB_PORT_53_UDP_ADDR"] == "10.96.3.4"
    assert not any(k.startswith("H_") for k in env)
