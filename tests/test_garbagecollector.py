"""Deletion with dependents, through the API server and the garbage collector: the
background default, Orphan, Foreground, finalizers that hold an object, and
deletecollection. Real etcd; the API server and the collector in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.api.store import Store
from corral.control.garbagecollector import GarbageCollector
from tests.apiserver_helpers import Served, served
from tests.control_helpers import eventually, running

NS = "/api/v1/namespaces/default"


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path)) as s, running(GarbageCollector(store).run()):
        yield s


async def _owner(api: Served, name: str) -> dict[str, Any]:
    """A ReplicationController with no replicas (no controller runs here: the test
    makes its dependents by hand)."""
    rc = {
        "apiVersion": "v1",
        "kind": "ReplicationController",
        "metadata": {"name": name},
        "spec": {
            "replicas": 0,
            "selector": {"app": name},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "command": ["true"]}]},
            },
        },
    }
    code, created = await api.request("POST", f"{NS}/replicationcontrollers", rc)
    assert code == 201, created
    return created


async def _dependent(api: Served, name: str, owner: dict[str, Any], **extra: Any) -> None:
    ref = {
        "apiVersion": "v1",
        "kind": "ReplicationController",
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "ownerReferences": [ref], **extra},
        "spec": {"containers": [{"name": "c", "command": ["true"]}]},
    }
    code, body = await api.request("POST", f"{NS}/pods", pod)
    assert code == 201, body


async def _exists(api: Served, path: str) -> bool:
    code, _ = await api.request("GET", path)
    return code == 200


async def _gone(api: Served, path: str) -> bool:
    return not await _exists(api, path)


async def test_background_deletion_takes_the_dependents(api: Served) -> None:
    owner = await _owner(api, "bg")
    await _dependent(api, "bg-1", owner)
    await _dependent(api, "bg-2", owner)
    code, _ = await api.request("DELETE", f"{NS}/replicationcontrollers/bg")
    assert code == 200
    assert await _gone(api, f"{NS}/replicationcontrollers/bg")  # at once
    for p in ("bg-1", "bg-2"):
        await eventually(lambda p=p: _gone(api, f"{NS}/pods/{p}"), what=f"{p} collected")


async def test_orphan_keeps_the_dependents_without_their_owner(api: Served) -> None:
    owner = await _owner(api, "orph")
    await _dependent(api, "orph-1", owner)
    code, _ = await api.request(
        "DELETE", f"{NS}/replicationcontrollers/orph?propagationPolicy=Orphan"
    )
    assert code == 200
    await eventually(
        lambda: _gone(api, f"{NS}/replicationcontrollers/orph"), what="the owner to go"
    )
    code, pod = await api.request("GET", f"{NS}/pods/orph-1")
    assert code == 200 and not pod["metadata"].get("ownerReferences"), pod


async def test_foreground_waits_for_the_dependents(api: Served) -> None:
    owner = await _owner(api, "fg")
    # the dependent has a finalizer of its own: the owner must wait for it
    await _dependent(api, "fg-1", owner, finalizers=["example.com/hold"])
    code, body = await api.request(
        "DELETE", f"{NS}/replicationcontrollers/fg?propagationPolicy=Foreground"
    )
    assert code == 200 and "foregroundDeletion" in body["metadata"]["finalizers"], body

    async def dependent_marked() -> bool:
        code, pod = await api.request("GET", f"{NS}/pods/fg-1")
        return code == 200 and bool(pod["metadata"].get("deletionTimestamp"))

    await eventually(dependent_marked, what="the dependent marked for deletion")
    assert await _exists(api, f"{NS}/replicationcontrollers/fg")  # still waiting
    # the dependent's finalizer goes: so does it, and then the owner
    patch = {"metadata": {"finalizers": None}}
    headers = {"Content-Type": "application/merge-patch+json"}
    code, _ = await api.request("PATCH", f"{NS}/pods/fg-1", patch, headers=headers)
    assert code == 200
    assert await _gone(api, f"{NS}/pods/fg-1")
    await eventually(
        lambda: _gone(api, f"{NS}/replicationcontrollers/fg"), what="the owner to go last"
    )


async def test_a_finalizer_holds_an_object_until_it_is_removed(api: Served) -> None:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "held", "finalizers": ["example.com/hold"]},
        "spec": {"ports": [{"port": 80}]},
    }
    code, _ = await api.request("POST", f"{NS}/services", svc)
    assert code == 201
    code, body = await api.request("DELETE", f"{NS}/services/held")
    assert code == 200 and body["metadata"]["deletionTimestamp"], body
    assert await _exists(api, f"{NS}/services/held")
    headers = {"Content-Type": "application/json-patch+json"}
    ops = [{"op": "remove", "path": "/metadata/finalizers/0"}]
    code, _ = await api.request("PATCH", f"{NS}/services/held", ops, headers=headers)
    assert code == 200
    assert await _gone(api, f"{NS}/services/held")


async def test_deletecollection_by_label(api: Served) -> None:
    for name, tier in (("dc-a", "web"), ("dc-b", "web"), ("dc-c", "db")):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"tier": tier}},
            "spec": {"containers": [{"name": "c", "command": ["true"]}]},
        }
        assert (await api.request("POST", f"{NS}/pods", pod))[0] == 201
    code, body = await api.request("DELETE", f"{NS}/pods?labelSelector=tier%3Dweb")
    assert code == 200 and body["kind"] == "PodList", body
    assert sorted(i["metadata"]["name"] for i in body["items"]) == ["dc-a", "dc-b"]
    assert await _gone(api, f"{NS}/pods/dc-a") and await _exists(api, f"{NS}/pods/dc-c")
