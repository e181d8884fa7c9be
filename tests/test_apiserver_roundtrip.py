"""Objects as a real kube-apiserver returns them go through corral's API unchanged
(managedFields, ownerReferences, finalizers, EndpointSlice zone/hints, the fields of
Kubernetes corral does not act on), while invalid input is still refused with the
field named. Real etcd; the API server in-process."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.api.objects import EndpointSlice, Pod, Service
from corral.api.store import Store
from tests.apiserver_helpers import Served, served

MANAGED = [
    {
        "apiVersion": "v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:labels": {".": {}, "f:component": {}, "f:provider": {}}},
            "f:spec": {
                "f:clusterIP": {},
                "f:internalTrafficPolicy": {},
                "f:ipFamilyPolicy": {},
                "f:ports": {
                    ".": {},
                    'k:{"port":443,"protocol":"TCP"}': {
                        ".": {},
                        "f:name": {},
                        "f:port": {},
                        "f:protocol": {},
                        "f:targetPort": {},
                    },
                },
                "f:sessionAffinity": {},
                "f:type": {},
            },
        },
        "manager": "kube-apiserver",
        "operation": "Update",
        "time": "2025-01-10T09:12:31Z",
    }
]

# `kubectl get svc kubernetes -o json` of a kind cluster (1.30), as kube-apiserver answers.
KUBERNETES_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "creationTimestamp": "2025-01-10T09:12:31Z",
        "labels": {"component": "apiserver", "provider": "kubernetes"},
        "managedFields": MANAGED,
        "name": "kubernetes",
        "namespace": "default",
        "resourceVersion": "234",
        "uid": "8e6c7d5c-4f1b-4a53-9f1b-6f8f4ad3c1a2",
    },
    "spec": {
        "clusterIP": "10.96.0.1",
        "clusterIPs": ["10.96.0.1"],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
        "sessionAffinity": "None",
        "type": "ClusterIP",
    },
    "status": {"loadBalancer": {}},
}

SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-x7k2p",
        "namespace": "default",
        "generateName": "web-",
        "labels": {
            "kubernetes.io/service-name": "web",
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        },
        "ownerReferences": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "name": "web",
                "uid": "0f6f1c4e-1111-4a53-9f1b-6f8f4ad3c1a2",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2025-01-10T09:13Z"},
    },
    "addressType": "IPv4",
    "endpoints": [
        {
            "addresses": ["10.244.1.5"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "worker-1",
            "zone": "eu-west-1a",
            "hints": {"forZones": [{"name": "eu-west-1a"}]},
            "targetRef": {
                "kind": "Pod",
                "name": "web-1",
                "namespace": "default",
                "uid": "4a1d7a34-2222-4a53-9f1b-6f8f4ad3c1a2",
            },
        }
    ],
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
}

# A pod as kube-apiserver returns it after the kubelet ran it: the service account's
# projected volume, tolerations the admission plugins add, the kubelet's status fields.
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "web-1",
        "namespace": "default",
        "labels": {"app": "web"},
        "finalizers": ["example.com/keep"],
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-5d4f",
                "uid": "7b3e-0000",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    },
    "spec": {
        "containers": [
            {
                "name": "c",
                "image": "busybox",
                "command": ["sleep", "3600"],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [
                    {
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        "name": "kube-api-access-abcde",
                        "readOnly": True,
                    }
                ],
                "resources": {},
            }
        ],
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "serviceAccount": "default",
        "serviceAccountName": "default",
        "tolerations": [
            {
                "effect": "NoExecute",
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "tolerationSeconds": 300,
            }
        ],
        "volumes": [
            {
                "name": "kube-api-access-abcde",
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}
                    ],
                },
            }
        ],
    },
    "status": {
        "phase": "Running",
        "qosClass": "BestEffort",
        "hostIPs": [{"ip": "172.18.0.2"}],
        "containerStatuses": [
            {
                "name": "c",
                "ready": True,
                "restartCount": 0,
                "started": True,
                "image": "docker.io/library/busybox:latest",
                "imageID": "docker.io/library/busybox@sha256:abc",
                "containerID": "containerd://0123",
                "state": {"running": {"startedAt": "2025-01-10T09:13:00Z"}},
            }
        ],
    },
}


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path)) as s:
        yield s


def _as_created(doc: dict[str, Any]) -> dict[str, Any]:
    """What a client sends to create a copy of `doc` (kubectl drops these)."""
    body = copy.deepcopy(doc)
    for k in ("resourceVersion", "uid", "creationTimestamp"):
        body["metadata"].pop(k, None)
    return body


def _contains(got: Any, want: Any, at: str = "") -> None:
    """Everything in `want` is in `got` (corral's defaults may be added)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), at
        for k, v in want.items():
            assert k in got, f"{at}.{k} dropped"
            _contains(got[k], v, f"{at}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), at
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _contains(g, w, f"{at}[{i}]")
    else:
        assert got == want, at


@pytest.mark.parametrize("doc", [KUBERNETES_SERVICE, SLICE, POD], ids=["svc", "slice", "pod"])
def test_the_models_take_what_kube_apiserver_returns(doc: dict[str, Any]) -> None:
    model = {"Service": Service, "EndpointSlice": EndpointSlice, "Pod": Pod}[doc["kind"]]
    _contains(model.model_validate(doc).dump(), doc)


async def test_kubernetes_service_with_managed_fields_round_trips(api: Served) -> None:
    code, created = await api.request(
        "POST", "/api/v1/namespaces/default/services", _as_created(KUBERNETES_SERVICE)
    )
    assert code == 201, created
    code, got = await api.request("GET", "/api/v1/namespaces/default/services/kubernetes")
    assert code == 200
    assert got["metadata"]["managedFields"] == MANAGED
    _contains(got, _as_created(KUBERNETES_SERVICE))
    # A PUT of what was read (kubectl replace, client-go Update) keeps it all.
    code, put = await api.request("PUT", "/api/v1/namespaces/default/services/kubernetes", got)
    assert code == 200, put
    assert put["metadata"]["managedFields"] == MANAGED and put["spec"] == got["spec"]


async def test_endpointslice_with_zone_and_hints_round_trips(api: Served) -> None:
    path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
    code, created = await api.request("POST", path, _as_created(SLICE))
    assert code == 201, created
    code, got = await api.request("GET", f"{path}/web-x7k2p")
    assert code == 200
    _contains(got, _as_created(SLICE))


async def test_pod_from_a_real_cluster_round_trips(api: Served) -> None:
    code, created = await api.request("POST", "/api/v1/namespaces/default/pods", _as_created(POD))
    assert code == 201, created
    code, got = await api.request("GET", "/api/v1/namespaces/default/pods/web-1")
    assert code == 200
    for k in ("volumes", "serviceAccountName", "enableServiceLinks", "tolerations"):
        assert got["spec"][k] == POD["spec"][k], k
    c = got["spec"]["containers"][0]
    assert c["volumeMounts"] == POD["spec"]["containers"][0]["volumeMounts"]
    assert c["terminationMessagePolicy"] == "File"
    assert got["metadata"]["finalizers"] == ["example.com/keep"]
    # status goes through the status subresource, as the kubelet writes it
    code, st = await api.request(
        "PUT", "/api/v1/namespaces/default/pods/web-1/status", dict(got, status=POD["status"])
    )
    assert code == 200, st
    assert st["status"]["qosClass"] == "BestEffort"
    assert st["status"]["containerStatuses"][0]["imageID"].endswith("@sha256:abc")


@pytest.mark.parametrize(
    ("path", "doc", "change", "field"),
    [
        (
            "/api/v1/namespaces/default/services",
            KUBERNETES_SERVICE,
            lambda d: d["spec"]["ports"][0].update(port=70000),
            "spec.ports[0].port",
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            SLICE,
            lambda d: d["endpoints"][0].update(zone=5),
            "endpoints[0].zone",
        ),
        (
            "/api/v1/namespaces/default/pods",
            POD,
            lambda d: d["metadata"]["managedFields"].append({"operation": "Delete"}),
            "metadata.managedFields[0].operation",
        ),
    ],
    ids=["bad-port", "zone-type", "managed-operation"],
)
async def test_invalid_input_is_still_refused_with_the_field(
    api: Served, path: str, doc: dict[str, Any], change: Any, field: str
) -> None:
    body = _as_created(doc)
    body["metadata"].setdefault("managedFields", [])
    change(body)
    code, st = await api.request("POST", path, body)
    assert code == 422, st
    assert st["reason"] == "Invalid"
    assert field in [c["field"] for c in st["details"]["causes"]], st


@pytest.mark.parametrize(
    ("path", "doc", "change", "field"),
    [
        (
            "/api/v1/namespaces/default/services",
            KUBERNETES_SERVICE,
            lambda d: d["spec"].update(clusterIPz="10.96.0.1"),
            "spec.clusterIPz",
        ),
        (
            "/api/v1/namespaces/default/pods",
            POD,
            lambda d: d["spec"]["containers"][0].update(imagez="x"),
            "spec.containers[0].imagez",
        ),
    ],
    ids=["service-typo", "container-typo"],
)
async def test_unknown_fields_follow_field_validation(
    api: Served, path: str, doc: dict[str, Any], change: Any, field: str
) -> None:
    """Strict refuses naming the field; Warn (the default) drops it with a Warning
    header; Ignore drops it silently; nothing is written by the refused request."""
    body = _as_created(doc)
    body["metadata"].pop("finalizers", None)  # deleted below, and made again
    change(body)
    name = body["metadata"]["name"]
    code, st = await api.request("POST", path + "?fieldValidation=Strict", body)
    assert code == 400 and st["reason"] == "BadRequest", st
    assert f'strict decoding error: unknown field "{field}"' in st["message"]
    code, _ = await api.request("GET", f"{path}/{name}")
    assert code == 404
    warnings = await api.warnings("POST", path, body)
    assert warnings == [f'299 - "unknown field \\"{field}\\""'], warnings
    code, got = await api.request("GET", f"{path}/{name}")
    assert code == 200 and field.rsplit(".", 1)[1] not in str(got), got
    code, _ = await api.request("DELETE", f"{path}/{name}?gracePeriodSeconds=0")
    assert code == 200
    assert await api.warnings("POST", path + "?fieldValidation=Ignore", body) == []
    code, st = await api.request("POST", path + "?fieldValidation=Lax", body)
    assert code == 400 and "fieldValidation" in st["message"]
