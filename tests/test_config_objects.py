"""ConfigMaps, Secrets and the pod fields that use them (volumes, volumeMounts,
env.valueFrom, envFrom): validation naming the field, the API server's and kubectl's
create/get/update, immutability and the 1 MiB limit. Real etcd and kubectl."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.api.manifest import ManifestError, parse_object
from corral.api.objects import ConfigMap, Secret, update_forbidden
from corral.api.store import Store
from tests.apiserver_helpers import Served, kubectl_path, served

MINOR = 33


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


def _c(**kw: Any) -> dict[str, Any]:
    return {"name": "c", "command": ["sleep", "1"], **kw}


def _refused(doc: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as e:
        parse_object(doc, "t.yaml")
    return str(e.value)


# ------------------------------------------------------------ model


def test_secret_string_data_is_merged_and_types_need_their_keys() -> None:
    s = parse_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s"},
            "data": {"a": base64.b64encode(b"old").decode()},
            "stringData": {"a": "new", "b": "two"},
        }
    )
    assert isinstance(s, Secret) and s.type == "Opaque"
    assert s.items() == {"a": b"new", "b": b"two"}
    assert "stringData" not in s.dump()  # write-only, as in Kubernetes

    def secret(type_: str, **string_data: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s"},
            "type": type_,
            "stringData": string_data,
        }

    assert "data[tls.key]: Required value" in _refused(
        secret("kubernetes.io/tls", **{"tls.crt": "x"})
    )
    assert "data[.dockerconfigjson]: Required value" in _refused(
        secret("kubernetes.io/dockerconfigjson")
    )
    assert "data[.dockerconfigjson]: Invalid value: not JSON" in _refused(
        secret("kubernetes.io/dockerconfigjson", **{".dockerconfigjson": "{nope"})
    )
    ok = parse_object(
        secret("kubernetes.io/dockerconfigjson", **{".dockerconfigjson": '{"auths": {}}'})
    )
    assert ok.type == "kubernetes.io/dockerconfigjson"  # type: ignore[attr-defined]
    bad64 = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"k": "!!"}}
    assert "data[k]: Invalid value: not valid base64" in _refused(bad64)
    assert "a valid config key" in _refused(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a/b": "x"}}
    )


def test_the_one_mebibyte_limit() -> None:
    big = "x" * (1024 * 1024)
    assert "must have at most 1048576 bytes" in _refused(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": big}}
    )
    assert "data: Too long" in _refused(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s"},
            "stringData": {"k": big + "x"},
        }
    )
    just = "x" * (1024 * 1024 - 1)  # key + value = 1 MiB: allowed
    parse_object(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": just}}
    )


def test_immutable_freezes_data_and_the_flag_and_a_secrets_type_never_changes() -> None:
    old = ConfigMap.model_validate(
        {"metadata": {"name": "c"}, "data": {"a": "1"}, "immutable": True}
    )
    assert update_forbidden(old, old.model_copy()) == []
    changed = ConfigMap.model_validate(
        {"metadata": {"name": "c"}, "data": {"a": "2"}, "immutable": True}
    )
    assert [f for f, _ in update_forbidden(old, changed)] == ["data"]
    thawed = ConfigMap.model_validate({"metadata": {"name": "c"}, "data": {"a": "1"}})
    assert [f for f, _ in update_forbidden(old, thawed)] == ["immutable"]
    mutable = ConfigMap.model_validate({"metadata": {"name": "c"}, "data": {"a": "1"}})
    assert update_forbidden(mutable, changed) == []  # may become immutable
    s1 = Secret.model_validate({"metadata": {"name": "s"}})
    s2 = Secret.model_validate({"metadata": {"name": "s"}, "type": "example.com/x"})
    assert update_forbidden(s1, s2) == [
        ("type", "Invalid value: 'example.com/x': field is immutable")
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"containers": [_c(volumeMounts=[{"name": "nope", "mountPath": "/x"}])]},
            "spec: containers[0].volumeMounts[0].name: Not found: 'nope'",
        ),
        (
            {
                "volumes": [{"name": "v", "emptyDir": {}}, {"name": "v", "emptyDir": {}}],
                "containers": [_c()],
            },
            "spec: volumes[1].name: Duplicate value: 'v'",
        ),
        (
            {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "containers": [_c(volumeMounts=[{"name": "v", "mountPath": "rel"}])],
            },
            "spec.containers[0].volumeMounts[0].mountPath: 'rel': must be an absolute path",
        ),
        (
            {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "containers": [
                    _c(volumeMounts=[{"name": "v", "mountPath": "/x", "subPath": "../etc"}])
                ],
            },
            "spec.containers[0].volumeMounts[0].subPath: path '../etc': must not contain '..'",
        ),
        (
            {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "containers": [
                    _c(
                        volumeMounts=[
                            {"name": "v", "mountPath": "/x"},
                            {"name": "v", "mountPath": "/x"},
                        ]
                    )
                ],
            },
            "containers[0].volumeMounts[1].mountPath: Invalid value: '/x': must be unique",
        ),
        (
            {
                "volumes": [
                    {
                        "name": "v",
                        "configMap": {"name": "c", "items": [{"key": "k", "path": "/abs"}]},
                    }
                ],
                "containers": [_c()],
            },
            "spec.volumes[0].configMap.items[0].path: path '/abs': must be a relative path",
        ),
        (
            {
                "volumes": [{"name": "v", "secret": {"secretName": "s", "defaultMode": 1000}}],
                "containers": [_c()],
            },
            "spec.volumes[0].secret.defaultMode: 1000: must be a number between 0 and 0777",
        ),
        (
            {"volumes": [{"name": "v"}], "containers": [_c()]},
            "spec.volumes[0]: volumes[v]: must specify exactly one volume source",
        ),
        (
            {
                "volumes": [{"name": "v", "hostPath": {"path": "/x", "type": "Dir"}}],
                "containers": [_c()],
            },
            "spec.volumes[0].hostPath.type: Input should be",
        ),
        (
            {"volumes": [{"name": "v", "hostPath": {"path": "x"}}], "containers": [_c()]},
            "spec.volumes[0].hostPath.path: 'x': must be an absolute path",
        ),
        (
            {
                "volumes": [{"name": "v", "emptyDir": {"medium": "Memory", "sizeLimit": "lots"}}],
                "containers": [_c()],
            },
            "spec.volumes[0].emptyDir.sizeLimit",
        ),
        (
            {
                "containers": [
                    _c(env=[{"name": "E", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}}])
                ]
            },
            "spec.containers[0].env[0].valueFrom: fieldPath: Unsupported value: 'spec.nope'",
        ),
        (
            {
                "containers": [
                    _c(
                        env=[
                            {
                                "name": "E",
                                "value": "x",
                                "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                            }
                        ]
                    )
                ]
            },
            "env[E].valueFrom: may not be specified when `value` is not empty",
        ),
        (
            {"containers": [_c(env=[{"name": "E", "valueFrom": {}}])]},
            "may not have more than one field specified at a time",
        ),
        (
            {"containers": [_c(envFrom=[{"prefix": "P_"}])]},
            "spec.containers[0].envFrom[0]: envFrom: exactly one of configMapRef or secretRef",
        ),
        (
            {
                "containers": [
                    _c(
                        env=[
                            {
                                "name": "E",
                                "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}},
                            }
                        ]
                    )
                ]
            },
            "spec.containers[0].env[0].valueFrom.resourceFieldRef.resource",
        ),
    ],
)
def test_bad_volumes_and_env_are_refused_naming_the_field(spec: dict, message: str) -> None:
    assert message in _refused(_pod(spec))


def test_good_volumes_and_env_load() -> None:
    p = parse_object(
        _pod(
            {
                "volumes": [
                    {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                    {
                        "name": "cfg",
                        "configMap": {
                            "name": "c",
                            "items": [{"key": "k", "path": "d/k"}],
                            "optional": True,
                        },
                    },
                    {"name": "creds", "secret": {"secretName": "s", "defaultMode": 0o400}},
                    {
                        "name": "info",
                        "downwardAPI": {
                            "items": [
                                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                                {
                                    "path": "mem",
                                    "resourceFieldRef": {
                                        "containerName": "c",
                                        "resource": "limits.memory",
                                    },
                                },
                            ]
                        },
                    },
                    {
                        "name": "all",
                        "projected": {
                            "sources": [
                                {"configMap": {"name": "c"}},
                                {"secret": {"name": "s"}},
                                {
                                    "downwardAPI": {
                                        "items": [
                                            {
                                                "path": "n",
                                                "fieldRef": {"fieldPath": "metadata.name"},
                                            }
                                        ]
                                    }
                                },
                            ]
                        },
                    },
                    {"name": "host", "hostPath": {"path": "/var/log", "type": "Directory"}},
                ],
                "containers": [
                    _c(
                        volumeMounts=[
                            {"name": "scratch", "mountPath": "/scratch"},
                            {
                                "name": "cfg",
                                "mountPath": "/etc/app/k",
                                "subPath": "d/k",
                                "readOnly": True,
                            },
                        ],
                        env=[
                            {
                                "name": "A",
                                "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}},
                            },
                            {
                                "name": "B",
                                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
                            },
                            {
                                "name": "C",
                                "valueFrom": {
                                    "resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}
                                },
                            },
                        ],
                        envFrom=[{"prefix": "S_", "secretRef": {"name": "s", "optional": True}}],
                    )
                ],
            }
        )
    )
    assert [v.kind for v in p.spec.volumes] == [  # type: ignore[attr-defined]
        "emptyDir", "configMap", "secret", "downwardAPI", "projected", "hostPath"
    ]  # fmt: skip
    # round trip: what was written is what is read back
    assert parse_object(p.dump()).dump() == p.dump()


# ------------------------------------------------------------ API server and kubectl


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path)) as s:
        yield s


async def test_kubectl_creates_configmaps_and_secrets(api: Served, tmp_path: Path) -> None:
    if kubectl_path(MINOR) is None:
        pytest.skip(f"kubectl 1.{MINOR} is not installed here")
    (tmp_path / "app.conf").write_text("port=80\n")
    # kubectl's typed clients send these as protobuf (apiserver/protobuf.py decodes them)
    await api.kubectl(MINOR, "create", "namespace", "cfg")
    await api.kubectl(
        MINOR, "-n", "cfg", "create", "configmap", "app", "--from-literal=mode=fast",
        f"--from-file={tmp_path / 'app.conf'}",
    )  # fmt: skip
    await api.kubectl(
        MINOR, "-n", "cfg", "create", "secret", "generic", "pw", "--from-literal=password=hunter2"
    )  # fmt: skip
    await api.kubectl(
        MINOR, "-n", "cfg", "create", "secret", "docker-registry", "reg",
        "--docker-server=registry.example:5000", "--docker-username=u", "--docker-password=p",
    )  # fmt: skip
    (tmp_path / "bin").write_bytes(bytes(range(256)))
    await api.kubectl(
        MINOR, "-n", "cfg", "create", "configmap", "bin", f"--from-file=blob={tmp_path / 'bin'}"
    )  # fmt: skip
    _, out = await api.kubectl(MINOR, "-n", "cfg", "get", "configmap", "bin", "-o", "json")
    assert base64.b64decode(json.loads(out)["binaryData"]["blob"]) == bytes(range(256))
    _, out = await api.kubectl(MINOR, "-n", "cfg", "get", "configmap", "app", "-o", "json")
    assert json.loads(out)["data"] == {"mode": "fast", "app.conf": "port=80\n"}
    _, out = await api.kubectl(MINOR, "-n", "cfg", "get", "secret", "pw", "-o", "json")
    assert base64.b64decode(json.loads(out)["data"]["password"]) == b"hunter2"
    _, out = await api.kubectl(MINOR, "-n", "cfg", "get", "secrets")
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert rows == {"pw": ["Opaque", "1"], "reg": ["kubernetes.io/dockerconfigjson", "1"]}, out
    _, out = await api.kubectl(MINOR, "-n", "cfg", "get", "cm")
    assert [r.split()[:2] for r in out.splitlines()[1:]] == [["app", "2"], ["bin", "1"]], out

    # immutable: the server refuses changes to data (kubectl shows the field)
    await api.kubectl(MINOR, "-n", "cfg", "patch", "configmap", "app", "-p", '{"immutable": true}')
    rc, out = await api.kubectl(
        MINOR,
        "-n",
        "cfg",
        "patch",
        "configmap",
        "app",
        "-p",
        '{"data": {"mode": "slow"}}',
        check=False,
    )
    assert rc != 0 and "data: Forbidden: field is immutable when `immutable` is set" in out, out
    rc, out = await api.kubectl(
        MINOR,
        "-n",
        "cfg",
        "patch",
        "secret",
        "pw",
        "-p",
        '{"type": "example.com/other"}',
        check=False,
    )
    assert rc != 0 and "type: Invalid value" in out, out

    # over 1 MiB: 422 naming the field; nothing stored
    big = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "big"},
        "stringData": {"k": "x" * (1 << 20 | 1)},
    }
    code, doc = await api.request("POST", "/api/v1/namespaces/cfg/secrets", big)
    assert code == 422 and "data: Too long" in doc["message"], doc
    code, _ = await api.request("GET", "/api/v1/namespaces/cfg/secrets/big")
    assert code == 404
    await api.kubectl(MINOR, "delete", "namespace", "cfg", "--wait=false")


# ------------------------------------------------------------ the corral CLI


def test_corral_apply_get_describe_and_immutable(etcd: Any, store: Store, tmp_path: Path) -> None:
    env = dict(os.environ, CORRAL_ETCD=etcd.url, CORRAL_STATE_DIR=str(tmp_path / "state"))

    def corral(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=env, input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    docs = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "frozen"},
            "data": {"a": "1"},
            "immutable": True,
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "tls"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": "CERT", "tls.key": "very-secret-key"},
        },
    ]
    r = corral("apply", "-f", "-", stdin=json.dumps({"kind": "List", "items": docs}))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["configmap/frozen created", "secret/tls created"]
    r = corral("get", "secrets")
    assert r.stdout.splitlines()[1].split()[:3] == ["tls", "kubernetes.io/tls", "2"], r.stdout
    r = corral("describe", "secret", "tls")
    assert "tls.key:  15 bytes" in r.stdout and "very-secret-key" not in r.stdout, r.stdout
    docs[0]["data"] = {"a": "2"}
    r = corral("apply", "-f", "-", stdin=json.dumps(docs[0]))
    assert r.returncode != 0
    assert "data: Forbidden: field is immutable when `immutable` is set" in r.stderr
    assert "nothing was changed" in r.stderr
    r = corral("get", "configmap", "frozen", "-o", "json")
    assert json.loads(r.stdout)["data"] == {"a": "1"}
    # a tls secret without its key: refused naming the field, nothing stored
    bad = {**docs[1], "metadata": {"name": "half"}, "stringData": {"tls.crt": "CERT"}}
    r = corral("apply", "-f", "-", stdin=json.dumps(bad))
    assert r.returncode != 0 and "data[tls.key]: Required value" in r.stderr, r.stderr
    assert corral("get", "secret", "half").returncode != 0
    assert corral("delete", "configmap", "frozen").returncode == 0


def test_corral_create_configmap_and_secrets(etcd: Any, store: Store, tmp_path: Path) -> None:
    env = dict(os.environ, CORRAL_ETCD=etcd.url, CORRAL_STATE_DIR=str(tmp_path / "state"))

    def corral(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    (tmp_path / "app.conf").write_text("port=80\n")
    (tmp_path / "blob").write_bytes(b"\xff\x00")
    assert corral("create", "namespace", "gen").returncode == 0
    r = corral(
        "create", "configmap", "app", "-n", "gen", "--from-literal=mode=fast",
        f"--from-file={tmp_path / 'app.conf'}", f"--from-file=raw={tmp_path / 'blob'}",
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout == "configmap/app created\n", r.stderr
    cm = json.loads(corral("get", "cm", "app", "-n", "gen", "-o", "json").stdout)
    assert cm["data"] == {"mode": "fast", "app.conf": "port=80\n"}
    assert base64.b64decode(cm["binaryData"]["raw"]) == b"\xff\x00"
    r = corral("create", "secret", "generic", "pw", "-n", "gen", "--from-literal=password=s3")
    assert r.returncode == 0, r.stderr
    r = corral(
        "create", "secret", "docker-registry", "reg", "-n", "gen", "--docker-server=r.example",
        "--docker-username=u", "--docker-password=p",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    reg = json.loads(corral("get", "secret", "reg", "-n", "gen", "-o", "json").stdout)
    auths = json.loads(base64.b64decode(reg["data"][".dockerconfigjson"]))["auths"]
    assert auths["r.example"]["auth"] == base64.b64encode(b"u:p").decode()
    r = corral("create", "secret", "tls", "t", "-n", "gen", "--cert", str(tmp_path / "app.conf"))
    assert r.returncode != 0 and "needs --cert FILE and --key FILE" in r.stderr
    r = corral("create", "configmap", "bad", "-n", "gen", "--from-literal=a b=1")
    assert r.returncode != 0 and "a valid config key" in r.stderr, r.stderr
    r = corral("create", "configmap", "app", "-n", "gen", "--from-literal=x=1")
    assert r.returncode != 0 and "already exists" in r.stderr
