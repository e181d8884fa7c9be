"""`corral apiserver` against the real kubectl (1.27 and 1.33) and raw HTTP, over a real
etcd: discovery, create/apply/get/delete, watch, paging, Status errors, authentication."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.api.store import Store
from tests.apiserver_helpers import Served, kubectl_path, served

MINORS = [pytest.param(m, id=f"kubectl-1.{m}") for m in (27, 33)]


def pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": "web"}},
        "spec": {
            "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "9"]}],
            **spec,
        },
    }


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path), bookmark_interval=0.3) as s:
        yield s


def _need(minor: int) -> None:
    if kubectl_path(minor) is None:
        pytest.skip(f"kubectl 1.{minor} is not installed here")


# ------------------------------------------------------------ kubectl


@pytest.mark.parametrize("minor", MINORS)
async def test_kubectl_discovery_and_not_found(api: Served, minor: int) -> None:
    _need(minor)
    _, out = await api.kubectl(minor, "api-resources")
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["pods"][1] == "po"
    assert "apps/v1" in lines["deployments"]
    assert "corral.dev/v1" in lines["networkconfigs"]
    assert "discovery.k8s.io/v1" in lines["endpointslices"]
    rc, out = await api.kubectl(minor, "get", "pod", "nope", check=False)
    assert rc != 0
    assert 'Error from server (NotFound): pods "nope" not found' in out
    rc, out = await api.kubectl(minor, "get", "deploy", "nope", "-n", "kube-system", check=False)
    assert 'deployments.apps "nope" not found' in out


@pytest.mark.parametrize("minor", MINORS)
async def test_kubectl_create_apply_get_delete(api: Served, minor: int, tmp_path: Any) -> None:
    _need(minor)
    manifest = tmp_path / "pod.json"
    manifest.write_text(json.dumps(pod("web")))
    _, out = await api.kubectl(minor, "create", "-f", str(manifest))
    assert "pod/web created" in out
    rc, out = await api.kubectl(minor, "create", "-f", str(manifest), check=False)
    assert rc != 0 and 'pods "web" already exists' in out
    _, out = await api.kubectl(minor, "get", "pods", "-o", "wide")
    header, row = out.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert "NODE" in header and row.split()[:3] == ["web", "0/1", "Pending"]
    _, out = await api.kubectl(minor, "delete", "pod", "web")
    assert 'pod "web" deleted' in out
    _, out = await api.kubectl(minor, "get", "pods", "-o", "name")
    assert out.strip() == ""

    # apply three times: created, configured (a label added), unchanged
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "front", "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    manifest = tmp_path / "svc.json"
    manifest.write_text(json.dumps(svc))
    _, out = await api.kubectl(minor, "apply", "-f", str(manifest))
    assert "service/front created" in out
    svc["metadata"]["labels"]["tier"] = "edge"
    svc["spec"]["ports"].append({"name": "b", "port": 81})
    svc["spec"]["ports"][0]["name"] = "a"
    manifest.write_text(json.dumps(svc))
    _, out = await api.kubectl(minor, "apply", "-f", str(manifest))
    assert "service/front configured" in out
    _, out = await api.kubectl(minor, "apply", "-f", str(manifest))
    assert "service/front unchanged" in out
    _, out = await api.kubectl(minor, "get", "svc", "front", "-o", "json")
    got = json.loads(out)
    assert got["metadata"]["labels"] == {"app": "web", "tier": "edge"}
    assert [p["port"] for p in got["spec"]["ports"]] == [80, 81]
    assert "kubectl.kubernetes.io/last-applied-configuration" in got["metadata"]["annotations"]
    _, out = await api.kubectl(minor, "get", "svc", "-l", "tier=edge")
    assert out.splitlines()[0].split()[:5] == [
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
    ]
    _, out = await api.kubectl(minor, "delete", "-f", str(manifest))
    assert 'service "front" deleted' in out


@pytest.mark.parametrize("minor", MINORS)
async def test_kubectl_get_watch_sees_changes(api: Served, minor: int) -> None:
    _need(minor)
    exe = kubectl_path(minor)
    assert exe is not None
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": f"{api.dir}/home-w{minor}",
        "KUBECONFIG": api.kubeconfig,
    }
    p = await asyncio.create_subprocess_exec(
        exe, "get", "pods", "-w", "--request-timeout=0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    assert p.stdout is not None
    try:
        # kubectl prints nothing for an empty list: wait for its watch to be open
        async def watching() -> None:
            while api.api.watches < 1:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(watching(), 30)
        status, _ = await api.request("POST", "/api/v1/namespaces/default/pods", pod("w1"))
        assert status == 201
        lines = []
        while not any(line.startswith("w1 ") for line in lines):
            lines.append((await asyncio.wait_for(p.stdout.readline(), 30)).decode())
        assert any(line.split()[:3] == ["w1", "0/1", "Pending"] for line in lines)
    finally:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        await p.wait()


# ------------------------------------------------------------ raw HTTP


async def test_anonymous_gets_401_except_health_and_version(api: Served) -> None:
    status, body = await api.request("GET", "/api/v1/pods", cert=None)
    assert status == 401
    assert body["kind"] == "Status" and body["reason"] == "Unauthorized" and body["code"] == 401
    for path in ("/healthz", "/readyz", "/livez"):
        status, body = await api.request("GET", path, cert=None)
        assert (status, body) == (200, "ok"), path
    status, body = await api.request("GET", "/version", cert=None)
    assert status == 200 and body["major"] == "1"
    status, _ = await api.request("GET", "/api/v1/pods")
    assert status == 200


async def test_status_errors(api: Served) -> None:
    base = "/api/v1/namespaces/default/pods"
    status, created = await api.request("POST", base, pod("a"))
    assert status == 201
    md = created["metadata"]
    assert md["uid"] and md["creationTimestamp"] and int(md["resourceVersion"]) > 0

    status, body = await api.request("POST", base, pod("a"))
    assert (status, body["reason"]) == (409, "AlreadyExists")

    stale = dict(created)
    stale["metadata"] = dict(md, resourceVersion=str(int(md["resourceVersion"]) - 1))
    status, body = await api.request("PUT", f"{base}/a", stale)
    assert (status, body["reason"]) == (409, "Conflict")
    assert "the object has been modified" in body["message"]

    status, body = await api.request("PUT", f"{base}/a", created)  # current resourceVersion
    assert status == 200 and body["metadata"]["resourceVersion"] == md["resourceVersion"]

    bad = pod("b")
    bad["spec"]["containers"][0]["ports"] = [{"containerPort": 70000}]
    status, body = await api.request("POST", base, bad)
    assert (status, body["reason"]) == (422, "Invalid")
    fields = [c["field"] for c in body["details"]["causes"]]
    assert fields == ["spec.containers[0].ports[0].containerPort"]

    status, body = await api.request("POST", base, pod("c") | {"kind": "Service"})
    assert (status, body["reason"]) == (400, "BadRequest")
    other = pod("d")
    other["metadata"]["namespace"] = "kube-system"
    status, body = await api.request("POST", base, other)
    assert status == 400 and "does not match the namespace" in body["message"]
    status, body = await api.request("POST", base, b"{not json")
    assert (status, body["reason"]) == (400, "BadRequest")
    status, body = await api.request("POST", "/api/v1/namespaces/nowhere/pods", pod("e"))
    assert (status, body["reason"]) == (404, "NotFound")
    assert body["message"] == 'namespaces "nowhere" not found'

    status, body = await api.request("PUT", base, pod("f"))
    assert (status, body["reason"]) == (405, "MethodNotAllowed")
    status, body = await api.request("GET", "/api/v1/gizmos")
    assert status == 404
    status, body = await api.request("GET", f"{base}/zz")
    assert (status, body["message"]) == (404, 'pods "zz" not found')
    status, body = await api.request("GET", "/api/v1/pods?fieldSelector=spec.color%3Dred")
    assert (status, body["reason"]) == (400, "BadRequest")
    assert "field label not supported" in body["message"]


async def test_status_subresource_and_patches(api: Served) -> None:
    base = "/api/v1/namespaces/default/pods"
    await api.request("POST", base, pod("s"))
    _, cur = await api.request("GET", f"{base}/s")
    cur["status"] = {"phase": "Running"}
    cur["metadata"]["labels"]["ignored"] = "yes"
    status, body = await api.request("PUT", f"{base}/s/status", cur)
    assert status == 200
    assert body["status"]["phase"] == "Running" and "ignored" not in body["metadata"]["labels"]
    # the main resource keeps the status it has
    cur = body
    cur["status"] = {"phase": "Failed"}
    status, body = await api.request("PUT", f"{base}/s", cur)
    assert status == 200 and body["status"]["phase"] == "Running"

    merge = {"Content-Type": "application/merge-patch+json"}
    status, body = await api.request(
        "PATCH", f"{base}/s", {"metadata": {"labels": {"x": "1"}}}, headers=merge
    )
    assert status == 200 and body["metadata"]["labels"] == {"app": "web", "x": "1"}
    jsonp = {"Content-Type": "application/json-patch+json"}
    ops = [{"op": "replace", "path": "/metadata/labels/x", "value": "2"}]
    status, body = await api.request("PATCH", f"{base}/s", ops, headers=jsonp)
    assert status == 200 and body["metadata"]["labels"]["x"] == "2"
    smp = {"Content-Type": "application/strategic-merge-patch+json"}
    patch = {"spec": {"containers": [{"name": "c", "image": "alpine"}]}}
    status, body = await api.request("PATCH", f"{base}/s", patch, headers=smp)
    assert status == 200
    assert body["spec"]["containers"][0]["image"] == "alpine"
    assert body["spec"]["containers"][0]["command"] == ["sleep", "9"]  # merged by name
    status, body = await api.request(
        "PATCH", f"{base}/s", {"spec": {"restartPolicy": "Sometimes"}}, headers=merge
    )
    assert (status, body["reason"]) == (422, "Invalid")
    assert body["details"]["causes"][0]["field"] == "spec.restartPolicy"
    status, body = await api.request(
        "PATCH", f"{base}/s", {"metadata": {"resourceVersion": "1"}}, headers=merge
    )
    assert (status, body["reason"]) == (409, "Conflict")
    status, body = await api.request(  # server-side apply needs a field manager
        "PATCH", f"{base}/s", {}, headers={"Content-Type": "application/apply-patch+yaml"}
    )
    assert (status, body["details"]["causes"][0]["field"]) == (422, "fieldManager")


async def test_list_pages_by_limit_and_continue(api: Served) -> None:
    base = "/api/v1/namespaces/default/pods"
    names = {f"p{i:02d}" for i in range(23)}
    for n in sorted(names):
        await api.request("POST", base, pod(n, {"app": "web" if n < "p15" else "db"}))
    seen: list[str] = []
    token, revisions = "", set()
    for _ in range(10):
        status, page = await api.request("GET", f"{base}?limit=10&continue={token}")
        assert status == 200
        seen += [i["metadata"]["name"] for i in page["items"]]
        revisions.add(page["metadata"]["resourceVersion"])
        token = page["metadata"].get("continue", "")
        if not token:
            break
    assert seen == sorted(names)
    assert len(revisions) == 1  # every page at the first page's revision
    status, page = await api.request("GET", f"{base}?limit=4&labelSelector=app%3Ddb")
    assert [i["metadata"]["name"] for i in page["items"]] == ["p15", "p16", "p17", "p18"]
    status, page = await api.request(
        "GET", f"{base}?limit=4&labelSelector=app%3Ddb&continue={page['metadata']['continue']}"
    )
    assert [i["metadata"]["name"] for i in page["items"]] == ["p19", "p20", "p21", "p22"]
    sel = "labelSelector=app+in+(db),app+notin+(web)&fieldSelector=metadata.name!%3Dp22"
    status, page = await api.request("GET", f"{base}?{sel}")
    assert status == 200 and len(page["items"]) == 7
    status, body = await api.request("GET", f"{base}?limit=1&continue=garbage")
    assert (status, body["reason"]) == (400, "BadRequest")


async def test_continue_after_compaction_is_410(api: Served, store: Store) -> None:
    base = "/api/v1/namespaces/default/pods"
    for n in ("a", "b", "c"):
        await api.request("POST", base, pod(n))
    _, page = await api.request("GET", f"{base}?limit=1")
    await api.request("POST", base, pod("d"))
    await store.compact(await store.revision())
    status, body = await api.request(
        "GET", f"{base}?limit=1&continue={page['metadata']['continue']}"
    )
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)


async def test_watch_from_compacted_revision_is_410(api: Served, store: Store) -> None:
    base = "/api/v1/namespaces/default/pods"
    _, created = await api.request("POST", base, pod("a"))
    old = created["metadata"]["resourceVersion"]
    merge = {"Content-Type": "application/merge-patch+json"}
    for i in range(3):
        await api.request(
            "PATCH", f"{base}/a", {"metadata": {"labels": {"n": str(i)}}}, headers=merge
        )
    await store.compact(await store.revision())
    events = await api.watch_lines(f"{base}?watch=1&resourceVersion={old}", 1)
    assert events[0]["type"] == "ERROR"
    st = events[0]["object"]
    assert (st["kind"], st["code"], st["reason"]) == ("Status", 410, "Expired")


async def test_watch_events_bookmarks_and_selector_transitions(api: Served) -> None:
    base = "/api/v1/namespaces/default/pods"
    _, created = await api.request("POST", base, pod("a", {"app": "web"}))
    rv = created["metadata"]["resourceVersion"]
    merge = {"Content-Type": "application/merge-patch+json"}

    async def changes() -> None:
        await asyncio.sleep(0.5)
        await api.request(
            "PATCH", f"{base}/a", {"metadata": {"labels": {"app": "db"}}}, headers=merge
        )
        await api.request(
            "PATCH", f"{base}/a", {"metadata": {"labels": {"app": "web"}}}, headers=merge
        )
        await api.request("POST", base, pod("b", {"app": "web"}))
        await api.request("DELETE", f"{base}/b")

    task = asyncio.create_task(changes())
    query = "labelSelector=app%3Dweb&allowWatchBookmarks=true&timeoutSeconds=3"
    path = f"{base}?watch=1&resourceVersion={rv}&{query}"
    events = await api.watch_lines(path, 30, timeout=30)  # ends on its own: timeoutSeconds
    await task
    real = [
        (e["type"], e["object"]["metadata"].get("name")) for e in events if e["type"] != "BOOKMARK"
    ]
    assert real[:4] == [("DELETED", "a"), ("ADDED", "a"), ("ADDED", "b"), ("DELETED", "b")]
    # DELETED on leaving the selector carries the last matching state
    assert events[[e["type"] for e in events].index("DELETED")]["object"]["metadata"]["labels"] == {
        "app": "web"
    }
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks and bookmarks[0]["object"]["kind"] == "Pod"
    assert int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) >= int(rv)


async def test_watch_without_resource_version_lists_first(api: Served) -> None:
    base = "/api/v1/namespaces/default/pods"
    await api.request("POST", base, pod("a"))
    await api.request("POST", base, pod("b"))
    events = await api.watch_lines(f"{base}?watch=1&timeoutSeconds=1", 5)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


async def test_table_and_generate_name(api: Served) -> None:
    base = "/api/v1/namespaces/default/pods"
    gen = pod("x")
    del gen["metadata"]["name"]
    gen["metadata"]["generateName"] = "web-"
    status, body = await api.request("POST", base, gen)
    assert status == 201 and body["metadata"]["name"].startswith("web-")
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    status, t = await api.request("GET", base, headers=accept)
    assert t["kind"] == "Table"
    assert [c["name"] for c in t["columnDefinitions"]][:2] == ["Name", "Ready"]
    assert t["rows"][0]["cells"][0] == body["metadata"]["name"]
    assert t["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    status, t = await api.request("GET", "/apis/corral.dev/v1/networkconfigs", headers=accept)
    assert [c["name"] for c in t["columnDefinitions"]] == ["Name", "Age"]
