"""The shared informer against a real etcd: one watch per kind, indexes, handlers, gates."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from corral.api.informer import (
    BY_NAMESPACE,
    BY_NODE,
    BY_OWNER,
    BY_POD_IP,
    InformerFactory,
    by_namespace,
    by_node,
    by_owner,
    by_pod_ip,
    selected,
)
from corral.api.objects import Node, OwnerReference, Pod, PodIP, SubnetLease
from corral.api.store import SUBNETS_PREFIX, Store, Unavailable, subnet_key
from corral.api.tracker import ChangeTracker
from corral.cluster.etcd import LocalEtcd
from corral.overlay import lease
from tests import kit
from tests.etcd_helpers import running_etcd

DEADLINE = 20.0


def pod(name: str, ns: str = "default", node: str | None = None, **labels: str) -> Pod:
    return Pod.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "command": ["sleep", "1"]}]},
        }
    )


def node(name: str) -> Node:
    return Node.model_validate({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})


async def until(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Wait for `cond` (a deadline for a hung test, not a timing assertion)."""
    await kit.eventually(cond, what, timeout, interval=0.01)


@contextlib.asynccontextmanager
async def started(factory: InformerFactory) -> AsyncIterator[InformerFactory]:
    factory.start()
    try:
        yield factory
    finally:
        await factory.stop()


def etcd_watchers(url: str) -> int:
    """etcd's own count of open watchers (its /metrics gauge)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^etcd_debugging_mvcc_watcher_total (\S+)$", text, re.M)
    assert m, "etcd /metrics has no watcher gauge"
    return int(float(m.group(1)))


async def test_consumers_share_one_watch_per_kind(store: Store, etcd: Any) -> None:
    opened: list[str] = []
    real = store.watch_prefix_raw

    def counting(prefix: str, *a: Any, **kw: Any) -> Any:
        opened.append(prefix)
        return real(prefix, *a, **kw)

    store.watch_prefix_raw = counting  # type: ignore[method-assign]
    await store.create(pod("a", node="n1"))
    await store.create(node("n1"))
    before = etcd_watchers(etcd.url)
    factory = InformerFactory(store)
    # Five consumers, as in `corral controllers`: three want pods, two want nodes.
    consumers = [factory.informer(k) for k in (Pod, Pod, Node, Pod, Node)]
    assert consumers[0] is consumers[1] is consumers[3]
    assert consumers[2] is consumers[4]
    seen: list[list[str]] = [[] for _ in consumers]
    for inf, log in zip(consumers, seen, strict=True):
        inf.on_change(lambda old, new, log=log: log.append((new or old).name))
    async with started(factory):
        await factory.wait_synced()
        await store.create(pod("b", node="n1"))
        await until(lambda: all("b" in s for s in seen[:2]) and "b" in seen[3], "pod b")
        assert sorted(opened) == sorted(["/corral/v1/pods/", "/corral/v1/nodes/"])
        # etcd agrees: two more watchers, not five (an upper bound: other tests' watchers
        # may still be closing, never opening).
        assert etcd_watchers(etcd.url) - before <= 2
    assert seen[0] == seen[1] == seen[3] == ["a", "b"]
    assert seen[2] == seen[4] == ["n1"]


async def test_indexes_follow_adds_updates_and_deletes(store: Store) -> None:
    factory = InformerFactory(store)
    pods = factory.informer(Pod)
    pods.add_index(BY_NODE, by_node)
    pods.add_index(BY_NODE, by_node)  # a second consumer asking again is fine
    pods.add_index(BY_NAMESPACE, by_namespace)
    await store.create(pod("early", node="n1", app="web"))
    async with started(factory):
        await pods.wait_synced()
        pods.add_index(BY_POD_IP, by_pod_ip)  # added late: built from the cache
        pods.add_index(BY_OWNER, by_owner)
        assert [p.name for p in pods.by_index(BY_NODE, "n1")] == ["early"]

        def names(index: str, value: str) -> list[str]:
            return [p.name for p in pods.by_index(index, value)]

        await store.create(pod("web", node="n1", app="web"))
        await store.create(pod("db", ns="prod", node="n2", app="db"))
        await until(lambda: len(pods.cache) == 3, "three pods")
        assert names(BY_NODE, "n1") == ["early", "web"]
        assert names(BY_NAMESPACE, "prod") == ["db"]
        assert [p.name for p in selected(pods, "default", {"app": "web"})] == ["early", "web"]
        assert selected(pods, "default", {}) == []

        def move(p: Pod) -> Pod:
            p.spec.node_name = "n2"
            p.status.pod_ip = "10.244.2.7"
            p.status.pod_ips = [PodIP(ip="10.244.2.7")]
            p.metadata.owner_references = [
                OwnerReference(api_version="v1", kind="ReplicationController", name="rc", uid="u1")
            ]
            return p

        await store.modify(Pod, "web", "default", move)
        await until(lambda: names(BY_NODE, "n2") == ["web", "db"], "web on n2")
        assert names(BY_NODE, "n1") == ["early"]
        assert names(BY_POD_IP, "10.244.2.7") == ["web"]
        assert names(BY_OWNER, "u1") == ["web"]
        await store.delete(Pod, "web", "default")
        await until(lambda: "default/web" not in pods.cache, "web deleted")
        assert names(BY_NODE, "n2") == ["db"]
        assert names(BY_POD_IP, "10.244.2.7") == []
        assert names(BY_OWNER, "u1") == []
        assert pods.index_values(BY_NODE) == ["n1", "n2"]


async def test_compaction_while_stopped_keeps_cache_and_indexes_right(store: Store) -> None:
    factory = InformerFactory(store)
    pods = factory.informer(Pod)
    pods.add_index(BY_NODE, by_node)
    events: list[tuple[str | None, str | None]] = []
    pods.on_change(
        lambda old, new: events.append(
            (old and old.spec.node_name, new and new.spec.node_name)  # type: ignore[arg-type]
        )
    )
    for name in ("keep", "gone", "moved"):
        await store.create(pod(name, node="n1"))
    async with started(factory):
        await pods.wait_synced()
        await until(lambda: len(events) == 3, "the initial adds")
    # Behind: nobody watches while things change, then etcd forgets the history.
    await store.delete(Pod, "gone", "default")

    def move(p: Pod) -> Pod:
        p.spec.node_name = "n2"
        return p

    await store.modify(Pod, "moved", "default", move)
    await store.create(pod("new", node="n2"))
    await store.compact(await store.revision())
    events.clear()
    async with started(factory):
        await until(lambda: len(events) == 3, "the missed changes")
        assert sorted(events, key=str) == sorted(
            [("n1", None), ("n1", "n2"), (None, "n2")], key=str
        )
        assert pods.watch_stats.relists == 1 and factory.stats()["Pod"]["relists"] == 1
        assert sorted(pods.cache) == ["default/keep", "default/moved", "default/new"]
        assert [p.name for p in pods.by_index(BY_NODE, "n1")] == ["keep"]
        assert [p.name for p in pods.by_index(BY_NODE, "n2")] == ["moved", "new"]
        # And the watch goes on from the right place.
        await store.create(pod("after", node="n1"))
        await until(lambda: "default/after" in pods.cache, "a change after the re-list")
        assert [p.name for p in pods.by_index(BY_NODE, "n1")] == ["after", "keep"]
        await until(lambda: len(events) == 4, "its handler event")


async def test_slow_handler_stalls_nobody_and_loses_nothing(store: Store) -> None:
    factory = InformerFactory(store)
    pods = factory.informer(Pod)
    gate = asyncio.Event()
    slow_seen: list[str] = []
    fast_seen: list[str] = []

    async def slow(old: Pod | None, new: Pod | None) -> None:
        await gate.wait()
        slow_seen.append((new or old).name)  # type: ignore[union-attr]

    pods.on_change(slow)
    pods.on_change(lambda old, new: fast_seen.append((new or old).name))
    async with started(factory):
        await pods.wait_synced()
        for i in range(20):
            await store.create(pod(f"p{i:02d}"))
        await until(lambda: len(fast_seen) == 20, "the fast handler to see every pod")
        assert len(pods.cache) == 20  # the cache did not wait either
        assert slow_seen == []
        assert pods.queue_depth >= 19
        gate.set()
        await until(lambda: len(slow_seen) == 20, "the slow handler to catch up")
        assert slow_seen == fast_seen == [f"p{i:02d}" for i in range(20)]
        assert pods.queue_depth == 0


async def test_synced_gate_and_late_handlers(store: Store) -> None:
    for i in range(5):
        await store.create(pod(f"p{i}"))
    factory = InformerFactory(store)
    pods = factory.informer(Pod)
    early: list[str] = []
    reg = pods.on_change(lambda old, new: early.append(new.name))
    assert not pods.has_synced
    async with started(factory):
        await pods.wait_synced()
        assert pods.has_synced and factory.has_synced
        assert len(pods.cache) == 5  # everything listed is in the cache at the gate
        await reg.wait_synced()
        assert sorted(early) == [f"p{i}" for i in range(5)]  # and the handler has seen it
        late: list[str] = []
        late_reg = pods.on_change(lambda old, new: late.append(new.name))
        await late_reg.wait_synced()
        assert sorted(late) == sorted(early)


async def test_handler_errors_do_not_stop_the_watch(store: Store) -> None:
    factory = InformerFactory(store)
    pods = factory.informer(Pod)
    good: list[str] = []
    tries: list[str] = []

    def broken(old: Pod | None, new: Pod | None) -> None:
        tries.append(new.name)  # type: ignore[union-attr]
        raise RuntimeError("handler bug (on purpose)")

    reg = pods.on_change(broken)
    pods.on_change(lambda old, new: good.append(new.name))
    async with started(factory):
        await pods.wait_synced()
        for i in range(3):
            await store.create(pod(f"p{i}"))
        await until(lambda: len(good) == 3 and len(tries) == 3, "every event")
        assert reg.errors == 3 and pods.handler_errors == 3
        assert pods.restarts == 0


async def test_raw_records_with_a_decoder(store: Store) -> None:
    factory = InformerFactory(store)
    leases = factory.raw(SUBNETS_PREFIX, lease.decode)
    assert factory.raw(SUBNETS_PREFIX, lease.decode) is leases
    rec = SubnetLease(subnet="10.244.3.0/24", node_name="n3", public_ip="10.0.0.3")
    await store.put_raw(subnet_key("10.244.3.0/24"), lease.encode(rec))
    await store.put_raw(subnet_key("10.244.4.0/24"), b"not json")
    async with started(factory):
        await leases.wait_synced()
        assert list(leases.cache) == [subnet_key("10.244.3.0/24")]
        assert leases.undecodable == 1
        assert leases.cache[subnet_key("10.244.3.0/24")].node_name == "n3"
        await store.delete_raw(subnet_key("10.244.3.0/24"))
        await until(lambda: not leases.cache, "the lease to go")


def test_change_tracker_coalesces() -> None:
    t: ChangeTracker[str, int] = ChangeTracker()
    t.record("a", 1, 2)
    t.record("a", 2, 3)  # A->B->C is A->C
    t.record("b", None, 5)
    t.record("b", 5, None)  # add then delete: nothing
    t.record("c", 1, 2)
    t.record("c", 2, 1)  # back where it started: nothing
    t.record("d", 4, None)
    assert len(t) == 2 and "a" in t and "b" not in t
    assert t.take() == {"a": (1, 3), "d": (4, None)}
    assert not t and t.take() == {}


async def test_controllers_process_opens_one_watch_per_kind(store: Store) -> None:
    """`corral controllers`: replication, endpoints and nodelifecycle share the pod watch."""
    from corral.control.manager import ControllerOptions, run_controllers

    opened: list[str] = []
    real = store.watch_prefix_raw

    def counting(prefix: str, *a: Any, **kw: Any) -> Any:
        opened.append(prefix)
        return real(prefix, *a, **kw)

    store.watch_prefix_raw = counting  # type: ignore[method-assign]
    task = asyncio.create_task(run_controllers(store, ControllerOptions()))
    try:
        kinds = {"pods", "nodes", "services", "replicationcontrollers", "deployments"}
        await until(lambda: {p.split("/")[3] for p in opened} >= kinds, "every kind's watch")
        assert sorted(opened) == sorted(set(opened))  # each prefix once
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def private_etcd() -> Iterator[LocalEtcd]:
    """An etcd of this test's own (it is stopped and restarted)."""
    with running_etcd("informer-etcd") as server:
        yield server


async def test_informer_rides_out_an_etcd_restart(private_etcd: LocalEtcd) -> None:
    loop = asyncio.get_running_loop()
    async with Store(private_etcd.url, timeout=2.0) as store:
        factory = InformerFactory(store)
        pods = factory.informer(Pod)
        pods.add_index(BY_NODE, by_node)
        await store.create(pod("before", node="n1"))
        async with started(factory):
            await pods.wait_synced()
            await loop.run_in_executor(None, private_etcd.stop)
            await until(lambda: pods.watch_stats.reconnects >= 1, "the watch to notice")
            await loop.run_in_executor(None, private_etcd.start)
            # A writer of its own; gRPC may refuse it for a moment while it backs off
            # from the refused connections, so it retries as every corral daemon does.
            other = Store(private_etcd.url)
            for _ in range(100):
                try:
                    await other.connect()
                    break
                except Unavailable:
                    await asyncio.sleep(0.1)
            try:
                await other.create(pod("after", node="n1"))
                await other.delete(Pod, "before", "default")
            finally:
                await other.close()
            await until(lambda: sorted(pods.cache) == ["default/after"], "the changes")
            assert [p.name for p in pods.by_index(BY_NODE, "n1")] == ["after"]
