"""The etcd store against a real etcd: CAS, create races, watch order, compaction."""

from __future__ import annotations

import asyncio

import pytest

from corral.api.objects import Node, Pod, Service
from corral.api.store import (
    AlreadyExists,
    Conflict,
    NotFound,
    Store,
    Unavailable,
    object_key,
    parse_endpoints,
)


def pod(name: str, **labels: str) -> Pod:
    return Pod.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}]},
        }
    )


def relabel(p: Pod) -> Pod:
    p.metadata.labels["changed"] = "yes"
    return p


async def test_create_get_update_roundtrip(store: Store) -> None:
    created = await store.create(pod("web", app="web"))
    assert created.metadata.uid and created.metadata.creation_timestamp
    got = await store.get(Pod, "web", "default")
    assert got is not None
    assert got.metadata.labels == {"app": "web"}
    assert got.metadata.resource_version == created.metadata.resource_version
    got.metadata.labels["tier"] = "front"
    updated = await store.update(got)
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
    again = await store.get(Pod, "web", "default")
    assert again.metadata.labels == {"app": "web", "tier": "front"}


async def test_cas_conflict_on_stale_resource_version(store: Store) -> None:
    await store.create(pod("web"))
    a = await store.get(Pod, "web", "default")
    b = await store.get(Pod, "web", "default")
    a.metadata.labels["writer"] = "a"
    await store.update(a)
    b.metadata.labels["writer"] = "b"
    with pytest.raises(Conflict):
        await store.update(b)
    final = await store.get(Pod, "web", "default")
    assert final.metadata.labels["writer"] == "a"


async def test_update_of_deleted_object_is_not_found(store: Store) -> None:
    await store.create(pod("web"))
    p = await store.get(Pod, "web", "default")
    await store.delete(Pod, "web", "default")
    with pytest.raises(NotFound):
        await store.update(p)


async def test_create_if_absent_race_between_two_clients(store: Store, etcd) -> None:
    other = Store(etcd.url)
    await other.connect()
    try:
        results = await asyncio.gather(
            *[s.create(pod("contended", writer=str(i))) for i, s in enumerate([store, other] * 10)],
            return_exceptions=True,
        )
    finally:
        await other.close()
    winners = [r for r in results if isinstance(r, Pod)]
    losers = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(winners) == 1 and len(losers) == 19
    stored = await store.get(Pod, "contended", "default")
    assert stored.metadata.uid == winners[0].metadata.uid


async def test_modify_retries_through_concurrent_writers(store: Store) -> None:
    await store.create(pod("counter"))

    def bump(p: Pod) -> Pod:
        p.metadata.annotations["n"] = str(int(p.metadata.annotations.get("n", "0")) + 1)
        return p

    await asyncio.gather(*[store.modify(Pod, "counter", "default", bump) for _ in range(20)])
    final = await store.get(Pod, "counter", "default")
    assert final.metadata.annotations["n"] == "20"


async def test_list_is_scoped_by_namespace(store: Store) -> None:
    await store.create(pod("a"))
    other = pod("b")
    other.metadata.namespace = "prod"
    await store.create(other)
    default, _ = await store.list(Pod, "default")
    everything, _ = await store.list(Pod)
    assert [p.name for p in default] == ["a"]
    assert sorted(p.name for p in everything) == ["a", "b"]


async def test_watch_delivers_every_event_in_order(store: Store) -> None:
    events = []
    start = await store.revision() + 1

    async def consume() -> None:
        async for ev in store.watch(Pod, "default", start_revision=start):
            events.append((ev.type, ev.object.name if ev.type != "DELETED" else ev.object))
            if len(events) == 61:
                return

    task = asyncio.create_task(consume())
    for i in range(20):
        await store.create(pod(f"p{i}"))
    for i in range(20):
        await store.modify(Pod, f"p{i}", "default", relabel)
    for i in range(20):
        await store.delete(Pod, f"p{i}", "default")
    await store.create(pod("last"))
    await asyncio.wait_for(task, 20)
    expected = (
        [("ADDED", f"p{i}") for i in range(20)]
        + [("MODIFIED", f"p{i}") for i in range(20)]
        + [("DELETED", f"default/p{i}") for i in range(20)]
        + [("ADDED", "last")]
    )
    assert events == expected


async def test_list_and_watch_resumes_after_compaction(store: Store) -> None:
    """A watcher whose revision was compacted away re-lists and emits what it missed."""
    await store.create(pod("keep"))
    await store.create(pod("gone"))
    await store.create(pod("changed"))
    _, rev = await store.list(Pod)
    known = {object_key(Pod, n, "default"): 0 for n in ("keep", "gone", "changed")}
    for k in list(known):
        known[k] = (await store.get_raw(k)).mod_revision

    # While "nobody watches": change things, then compact past them.
    await store.delete(Pod, "gone", "default")
    await store.modify(Pod, "changed", "default", relabel)
    await store.create(pod("new"))
    now = await store.revision()
    await store.compact(now)

    seen = []

    async def consume() -> None:
        async for ev in store.watch(Pod, "default", start_revision=rev + 1, known=known):
            name = ev.object if ev.type == "DELETED" else ev.object.name
            seen.append((ev.type, name))
            if len(seen) == 4:
                return

    task = asyncio.create_task(consume())
    # After the resync, live events keep flowing from the right revision.
    await asyncio.sleep(0.5)
    await store.create(pod("after"))
    await asyncio.wait_for(task, 20)
    assert set(seen[:3]) == {("DELETED", "default/gone"), ("MODIFIED", "changed"), ("ADDED", "new")}
    assert seen[3] == ("ADDED", "after")


async def test_cluster_scoped_and_namespaced_keys(store: Store) -> None:
    node = Node.model_validate({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
    await store.create(node)
    kv = await store.get_raw("/corral/v1/nodes/node-1")
    assert kv is not None
    svc = Service.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "prod"},
            "spec": {"ports": [{"port": 80}]},
        }
    )
    await store.create(svc)
    assert await store.get_raw("/corral/v1/services/prod/web") is not None


async def test_raw_lease_expiry_removes_key(store: Store) -> None:
    lease = await store.grant_lease(1)
    await store.create_raw("/corral/v1/subnets/10.244.9.0-24", b"{}", lease=lease)
    with pytest.raises(AlreadyExists):
        await store.create_raw("/corral/v1/subnets/10.244.9.0-24", b"{}")
    for _ in range(100):
        if await store.get_raw("/corral/v1/subnets/10.244.9.0-24") is None:
            break
        await asyncio.sleep(0.1)
    assert await store.get_raw("/corral/v1/subnets/10.244.9.0-24") is None


async def test_failover_to_the_next_endpoint(etcd) -> None:
    s = Store(["http://127.0.0.1:1", etcd.url])
    await s.connect()
    try:
        assert s.url == etcd.url
        await s.put_raw("/corral/test/failover", b"1")
    finally:
        await s.delete_raw("/corral/test/failover")
        await s.close()


async def test_unreachable_etcd_names_every_endpoint() -> None:
    s = Store(["http://127.0.0.1:1", "http://127.0.0.1:2"], timeout=1)
    with pytest.raises(Unavailable) as e:
        await s.connect()
    assert "127.0.0.1:1" in str(e.value) and "127.0.0.1:2" in str(e.value)


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://", "http://h:notaport", ""])
def test_bad_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoints(bad)
