"""More of kubectl against `corral apiserver`: get/apply/delete with every kubectl from
1.27 to 1.33, and with 1.27 and 1.33 replace, label, annotate, the three patch types,
scale (the `scale` subresource), delete --wait, wait --for=condition, the output
formats, -L/-A/--field-selector, diff (dryRun=All) and kubectl's Conflict/Invalid
texts. Real etcd, real kubectl; the API server in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.api.store import Store
from tests.apiserver_helpers import Served, kubectl_path, served

ALL_MINORS = [pytest.param(m, id=f"kubectl-1.{m}") for m in range(27, 34)]
MINORS = [pytest.param(m, id=f"kubectl-1.{m}") for m in (27, 33)]


def _need(minor: int) -> None:
    if kubectl_path(minor) is None:
        pytest.skip(f"kubectl 1.{minor} is not installed here")


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "9"]}]},
    }


def deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": pod(name)["spec"],
            },
        },
    }


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path)) as s:
        yield s


def _write(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


async def _get(api: Served, path: str) -> dict[str, Any]:
    code, doc = await api.request("GET", path)
    assert code == 200, doc
    return doc


# ------------------------------------------------------------ every version


@pytest.mark.parametrize("minor", ALL_MINORS)
async def test_get_apply_delete_with_every_kubectl(api: Served, minor: int, tmp_path: Path) -> None:
    _need(minor)
    f = _write(tmp_path / "pod.json", pod("skew"))
    _, out = await api.kubectl(minor, "apply", "-f", f)
    assert "pod/skew created" in out
    _, out = await api.kubectl(minor, "get", "pods")
    assert out.splitlines()[1].split()[:3] == ["skew", "0/1", "Pending"], out
    _, out = await api.kubectl(minor, "apply", "-f", f)
    assert "pod/skew unchanged" in out
    _, out = await api.kubectl(minor, "delete", "-f", f)
    assert 'pod "skew" deleted' in out
    rc, out = await api.kubectl(minor, "get", "pod", "skew", check=False)
    assert rc != 0 and 'pods "skew" not found' in out


# ------------------------------------------------------------ 1.27 and 1.33


@pytest.mark.parametrize("minor", MINORS)
async def test_replace_label_annotate_and_conflict(api: Served, minor: int, tmp_path: Path) -> None:
    _need(minor)
    await api.kubectl(minor, "create", "-f", _write(tmp_path / "p.json", pod("web")))
    _, out = await api.kubectl(minor, "get", "pod", "web", "-o", "json")
    read = json.loads(out)
    changed = json.loads(out)
    changed["metadata"]["labels"]["tier"] = "front"
    _, out = await api.kubectl(minor, "replace", "-f", _write(tmp_path / "r.json", changed))
    assert "pod/web replaced" in out
    # a replace of the old copy (its resourceVersion is stale): kubectl's Conflict text
    rc, out = await api.kubectl(
        minor, "replace", "-f", _write(tmp_path / "old.json", read), check=False
    )
    assert rc != 0
    assert "Error from server (Conflict)" in out, out
    assert (
        'Operation cannot be fulfilled on pods "web": the object has been modified; '
        "please apply your changes to the latest version and try again" in out
    )

    _, out = await api.kubectl(minor, "label", "pod", "web", "env=prod")
    assert "pod/web labeled" in out
    rc, out = await api.kubectl(minor, "label", "pod", "web", "env=dev", check=False)
    assert rc != 0 and "already has a value (prod)" in out
    _, out = await api.kubectl(minor, "label", "pod", "web", "env=dev", "--overwrite")
    assert "pod/web labeled" in out
    _, out = await api.kubectl(minor, "label", "pod", "web", "tier-")
    assert "pod/web unlabeled" in out
    _, out = await api.kubectl(minor, "annotate", "pod", "web", "note=hello world")
    assert "pod/web annotate" in out  # 1.27 prints "annotate", later ones "annotated"
    got = await _get(api, "/api/v1/namespaces/default/pods/web")
    assert got["metadata"]["labels"] == {"app": "web", "env": "dev"}
    assert got["metadata"]["annotations"]["note"] == "hello world"

    # Invalid: kubectl's text names the kind, the object and the field.
    bad = pod("bad")
    bad["spec"]["containers"][0]["ports"] = [{"containerPort": 70000}]
    rc, out = await api.kubectl(
        minor, "create", "-f", _write(tmp_path / "bad.json", bad), check=False
    )
    assert rc != 0
    assert 'The Pod "bad" is invalid' in out and "spec.containers[0].ports[0].containerPort" in out


@pytest.mark.parametrize("minor", MINORS)
async def test_patch_in_the_three_types(api: Served, minor: int, tmp_path: Path) -> None:
    _need(minor)
    await api.kubectl(minor, "create", "-f", _write(tmp_path / "p.json", pod("web")))
    for kind, patch in (
        ("strategic", {"metadata": {"labels": {"s": "1"}}}),
        ("merge", {"metadata": {"labels": {"m": "1", "app": None}}}),
        ("json", [{"op": "add", "path": "/metadata/labels/j", "value": "1"}]),
    ):
        _, out = await api.kubectl(
            minor, "patch", "pod", "web", "--type", kind, "-p", json.dumps(patch)
        )
        assert "pod/web patched" in out, (kind, out)
    # strategic merge on a list keyed by name: the container's image changes, the
    # container stays
    _, out = await api.kubectl(
        minor, "patch", "pod", "web", "-p",
        json.dumps({"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}),
    )  # fmt: skip
    got = await _get(api, "/api/v1/namespaces/default/pods/web")
    assert got["metadata"]["labels"] == {"s": "1", "m": "1", "j": "1"}
    [c] = got["spec"]["containers"]
    assert c["image"] == "busybox:2" and c["command"] == ["sleep", "9"]
    # a patch that makes the object invalid changes nothing
    rc, out = await api.kubectl(
        minor, "patch", "pod", "web", "--type", "json", "-p",
        json.dumps([{"op": "replace", "path": "/spec/containers/0/name", "value": "B_"}]),
        check=False,
    )  # fmt: skip
    assert rc != 0 and "is invalid" in out, out
    assert (await _get(api, "/api/v1/namespaces/default/pods/web")) == got
    # unchanged by a patch that changes nothing
    _, out = await api.kubectl(minor, "patch", "pod", "web", "-p", '{"metadata":{"labels":{}}}')
    assert "pod/web patched (no change)" in out


@pytest.mark.parametrize("minor", MINORS)
async def test_scale_deployments_and_replication_controllers(
    api: Served, minor: int, tmp_path: Path
) -> None:
    _need(minor)
    await api.kubectl(minor, "create", "-f", _write(tmp_path / "d.json", deployment("web")))
    _, out = await api.kubectl(minor, "scale", "deployment", "web", "--replicas=3")
    assert "deployment.apps/web scaled" in out
    got = await _get(api, "/apis/apps/v1/namespaces/default/deployments/web")
    assert got["spec"]["replicas"] == 3
    scale = await _get(api, "/apis/apps/v1/namespaces/default/deployments/web/scale")
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 3} and scale["status"]["selector"] == "app=web"
    # --current-replicas: kubectl's precondition
    rc, out = await api.kubectl(
        minor, "scale", "deploy/web", "--current-replicas=2", "--replicas=1", check=False
    )
    assert rc != 0 and "Expected replicas to be 2, was 3" in out, out

    rc_doc = {
        "apiVersion": "v1",
        "kind": "ReplicationController",
        "metadata": {"name": "old"},
        "spec": {
            "replicas": 1,
            "selector": {"app": "old"},
            "template": {"metadata": {"labels": {"app": "old"}}, "spec": pod("x")["spec"]},
        },
    }
    await api.kubectl(minor, "create", "-f", _write(tmp_path / "rc.json", rc_doc))
    _, out = await api.kubectl(minor, "scale", "rc", "old", "--replicas=0")
    assert "replicationcontroller/old scaled" in out
    got = await _get(api, "/api/v1/namespaces/default/replicationcontrollers/old")
    assert got["spec"]["replicas"] == 0
    code, st = await api.request(
        "PUT",
        "/api/v1/namespaces/default/replicationcontrollers/old/scale",
        {"kind": "Scale", "apiVersion": "autoscaling/v1", "spec": {"replicas": -1}},
    )
    assert code == 422 and st["details"]["causes"][0]["field"] == "spec.replicas", st


@pytest.mark.parametrize("minor", MINORS)
async def test_output_formats_and_selectors(api: Served, minor: int, tmp_path: Path) -> None:
    _need(minor)
    code, _ = await api.request(
        "POST", "/api/v1/namespaces", {"metadata": {"name": f"other{minor}"}}
    )
    assert code == 201
    for name, ns, labels in (
        ("a", "default", {"app": "web", "tier": "front"}),
        ("b", "default", {"app": "db"}),
        ("c", f"other{minor}", {"app": "web"}),
    ):
        code, _ = await api.request("POST", f"/api/v1/namespaces/{ns}/pods", pod(name, **labels))
        assert code == 201
    _, out = await api.kubectl(minor, "get", "pod", "a", "-o", "yaml")
    assert "kind: Pod" in out and "name: a" in out
    _, out = await api.kubectl(minor, "get", "pods", "-o", "jsonpath={.items[*].metadata.name}")
    assert out.split() == ["a", "b"]
    _, out = await api.kubectl(
        minor, "get", "pods", "-o", "custom-columns=NAME:.metadata.name,APP:.metadata.labels.app"
    )
    assert [line.split() for line in out.splitlines()] == [
        ["NAME", "APP"],
        ["a", "web"],
        ["b", "db"],
    ]
    _, out = await api.kubectl(minor, "get", "pods", "-L", "tier")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0][-1] == "TIER" and lines[1][0] == "a" and lines[1][-1] == "front"
    _, out = await api.kubectl(minor, "get", "pods", "-A", "-l", "app=web")
    rows = sorted(tuple(line.split()[:2]) for line in out.splitlines()[1:])
    assert rows == [("default", "a"), (f"other{minor}", "c")]
    _, out = await api.kubectl(
        minor, "get", "pods", "-A", "--field-selector", "metadata.name=b", "-o", "name"
    )
    assert out.split() == ["pod/b"]
    _, out = await api.kubectl(
        minor, "get", "pods", "--field-selector", "status.phase!=Pending", "-o", "name"
    )
    assert out.strip() == ""
    rc, out = await api.kubectl(
        minor, "get", "pods", "--field-selector", "spec.image=x", check=False
    )
    assert rc != 0 and "field label not supported" in out.lower(), out


@pytest.mark.parametrize("minor", MINORS)
async def test_delete_wait_and_wait_for_condition(api: Served, minor: int, tmp_path: Path) -> None:
    _need(minor)
    await api.kubectl(minor, "create", "-f", _write(tmp_path / "p.json", pod("web")))

    async def ready() -> None:
        # as a kubelet would: the Ready condition through the status subresource
        while api.api.watches < 1:  # kubectl wait watches the pod
            await asyncio.sleep(0.05)
        got = await _get(api, "/api/v1/namespaces/default/pods/web")
        got["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        code, st = await api.request("PUT", "/api/v1/namespaces/default/pods/web/status", got)
        assert code == 200, st

    (_, out), _ = await asyncio.gather(
        api.kubectl(minor, "wait", "--for=condition=Ready", "pod/web", "--timeout=60s"),
        ready(),
    )
    assert "pod/web condition met" in out
    _, out = await api.kubectl(minor, "delete", "pod", "web", "--wait")
    assert 'pod "web" deleted' in out
    rc, out = await api.kubectl(minor, "get", "pod", "web", check=False)
    assert rc != 0 and "NotFound" in out


@pytest.mark.parametrize("minor", MINORS)
async def test_diff_is_a_dry_run(api: Served, minor: int, tmp_path: Path) -> None:
    _need(minor)
    doc = deployment("web", 2)
    f = _write(tmp_path / "d.json", doc)
    # not there yet: a dry-run create, nothing written
    rc, out = await api.kubectl(minor, "diff", "-f", f, check=False)
    assert rc == 1 and "+  name: web" in out, out
    code, _ = await api.request("GET", "/apis/apps/v1/namespaces/default/deployments/web")
    assert code == 404
    await api.kubectl(minor, "apply", "-f", f)
    before = await _get(api, "/apis/apps/v1/namespaces/default/deployments/web")
    rc, out = await api.kubectl(minor, "diff", "-f", f, check=False)
    assert rc == 0 and out.strip() == "", out
    doc["spec"]["replicas"] = 5
    f = _write(tmp_path / "d.json", doc)
    rc, out = await api.kubectl(minor, "diff", "-f", f, check=False)
    assert rc == 1 and "-  replicas: 2" in out and "+  replicas: 5" in out, out
    after = await _get(api, "/apis/apps/v1/namespaces/default/deployments/web")
    assert after == before


async def test_dry_run_writes_nothing(api: Served) -> None:
    base = "/api/v1/namespaces/default/pods"
    code, got = await api.request("POST", f"{base}?dryRun=All", pod("dry"))
    assert code == 201 and got["metadata"]["uid"] and "resourceVersion" not in got["metadata"]
    code, _ = await api.request("GET", f"{base}/dry")
    assert code == 404
    code, st = await api.request("POST", f"{base}?dryRun=Some", pod("dry"))
    assert code == 400 and "dryRun" in st["message"]
    code, made = await api.request("POST", base, pod("dry"))
    assert code == 201
    code, st = await api.request("POST", f"{base}?dryRun=All", pod("dry"))
    assert code == 409 and st["reason"] == "AlreadyExists"
    code, got = await api.request(
        "PATCH",
        f"{base}/dry?dryRun=All",
        {"metadata": {"labels": {"x": "y"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert code == 200 and got["metadata"]["labels"]["x"] == "y"
    code, got = await api.request("DELETE", f"{base}/dry?dryRun=All")
    assert code == 200
    assert await _get(api, f"{base}/dry") == made


@pytest.mark.parametrize("minor", MINORS)
async def test_explain_reads_the_models_schemas(api: Served, minor: int) -> None:
    """kubectl explain reads /openapi/v3: the kind, a nested field, its type and doc."""
    _need(minor)
    rc, out = await api.kubectl(minor, "explain", "pods")
    assert rc == 0, out
    assert "KIND:" in out and "Pod" in out and "spec" in out
    rc, out = await api.kubectl(minor, "explain", "pod.spec.containers.ports.containerPort")
    assert rc == 0, out
    assert "FIELD: containerPort <integer>" in out or "containerPort <integer>" in out, out
    rc, out = await api.kubectl(minor, "explain", "deployment.spec.replicas")
    assert rc == 0 and "replicas" in out, out
    rc, out = await api.kubectl(minor, "explain", "pod.spec.nosuchfield", check=False)
    assert rc != 0 and "nosuchfield" in out, out


@pytest.mark.parametrize("minor", MINORS)
async def test_apply_with_an_unknown_field_is_refused_by_the_server(
    api: Served, tmp_path: Path, minor: int
) -> None:
    """kubectl finds fieldValidation in /openapi/v3 and sends Strict: the server's
    refusal names the field; --validate=false drops it with nothing refused."""
    _need(minor)
    doc = pod(f"typo-{minor}")
    doc["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    path = _write(tmp_path / "typo.json", doc)
    rc, out = await api.kubectl(minor, "apply", "-f", path, check=False)
    assert rc != 0, out
    assert 'unknown field "spec.containers[0].imagePullPolicyy"' in out, out
    rc, out = await api.kubectl(minor, "get", "pod", f"typo-{minor}", check=False)
    assert rc != 0 and "NotFound" in out
    rc, out = await api.kubectl(minor, "apply", "--validate=false", "-f", path)
    assert rc == 0 and "created" in out, out


def _managers(obj: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(e["manager"], e["operation"]): e["fieldsV1"] for e in obj["metadata"]["managedFields"]}


@pytest.mark.parametrize("minor", MINORS)
async def test_server_side_apply_owns_fields_and_reports_conflicts(
    api: Served, tmp_path: Path, minor: int
) -> None:
    _need(minor)
    name = f"ssa-{minor}"
    doc = deployment(name, replicas=2)
    doc["metadata"]["labels"] = {"tier": "web"}
    path = _write(tmp_path / "d.json", doc)
    rc, out = await api.kubectl(minor, "apply", "--server-side", "-f", path)
    assert rc == 0 and "serverside-applied" in out, out
    rc, out = await api.kubectl(minor, "apply", "--server-side", "-f", path)  # again: no change
    assert rc == 0 and "serverside-applied" in out, out
    rc, out = await api.kubectl(minor, "get", "deploy", name, "-o", "json", "--show-managed-fields")
    live = json.loads(out)
    owned = _managers(live)[("kubectl", "Apply")]
    assert "f:replicas" in owned["f:spec"] and "f:tier" in owned["f:metadata"]["f:labels"]

    # another manager wants another value of a field kubectl owns: refused, field named
    other = deployment(name, replicas=5)
    other_path = _write(tmp_path / "o.json", other)
    args = ("apply", "--server-side", "--field-manager=autoscaler", "-f", other_path)
    rc, out = await api.kubectl(minor, *args, check=False)
    assert rc != 0, out
    assert 'conflict with "kubectl"' in out and ".spec.replicas" in out, out
    rc, out = await api.kubectl(minor, "get", "deploy", name, "-o", "jsonpath={.spec.replicas}")
    assert out.strip() == "2"
    # --force-conflicts takes the field over
    rc, out = await api.kubectl(minor, *args, "--force-conflicts")
    assert rc == 0, out
    rc, out = await api.kubectl(minor, "get", "deploy", name, "-o", "json", "--show-managed-fields")
    live = json.loads(out)
    assert live["spec"]["replicas"] == 5
    m = _managers(live)
    assert "f:replicas" in m[("autoscaler", "Apply")]["f:spec"]
    assert "f:replicas" not in m[("kubectl", "Apply")]["f:spec"]

    # a field kubectl no longer applies, and nobody else owns, leaves the object
    del doc["metadata"]["labels"]
    del doc["spec"]["replicas"]
    _write(tmp_path / "d.json", doc)
    rc, out = await api.kubectl(minor, "apply", "--server-side", "-f", path)
    assert rc == 0, out
    rc, out = await api.kubectl(minor, "get", "deploy", name, "-o", "json")
    live = json.loads(out)
    assert "tier" not in (live["metadata"].get("labels") or {})
    assert live["spec"]["replicas"] == 5  # the autoscaler's, kept
