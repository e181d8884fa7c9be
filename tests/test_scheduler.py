"""The scheduler against a real etcd: spreading, resources, selectors, taints, retries."""

from __future__ import annotations

import random
from collections import Counter

from corral.api.objects import Node, Pod
from corral.api.store import Store
from corral.control.placement import NodeInfo, choose_node, filter_node
from corral.control.scheduler import Scheduler
from tests.control_helpers import eventually, make_node, make_pod, running


async def _pods(store: Store) -> list[Pod]:
    return (await store.list(Pod))[0]


async def _all_bound(store: Store, n: int) -> list[Pod] | None:
    pods = await _pods(store)
    return pods if len(pods) == n and all(p.spec.node_name for p in pods) else None


async def _unschedulable(store: Store, name: str) -> str | None:
    pod = await store.get(Pod, name, "default")
    c = pod.status.condition("PodScheduled") if pod else None
    if c is not None and c.status == "False" and c.reason == "Unschedulable":
        return c.message
    return None


async def test_six_replicas_spread_over_three_nodes(store: Store) -> None:
    for i in range(3):
        await store.create(make_node(f"node-{i}"))
    for i in range(6):
        await store.create(make_pod(f"web-{i}", {"app": "web"}))
    async with running(Scheduler(store, seed=1).run()):
        pods = await eventually(lambda: _all_bound(store, 6), what="6 pods bound")
    assert sorted(Counter(p.spec.node_name for p in pods).values()) == [2, 2, 2]
    for p in pods:
        cond = p.status.condition("PodScheduled")
        assert cond is not None and cond.status == "True"


async def test_too_large_pod_stays_pending_with_reason_until_a_node_fits(store: Store) -> None:
    for i in range(3):
        await store.create(make_node(f"node-{i}", memory="1Gi"))
    await store.create(make_pod("big", requests={"memory": "8Gi"}))
    await store.create(make_pod("small", requests={"memory": "100Mi"}))
    async with running(Scheduler(store, seed=1, initial_backoff=0.2).run()):
        msg = await eventually(lambda: _unschedulable(store, "big"), what="Unschedulable")
        assert msg == "0/3 nodes are available: 3 Insufficient memory."
        await eventually(lambda: _all_bound_named(store, "small"), what="small bound")
        big = await store.get(Pod, "big", "default")
        assert big.spec.node_name is None and big.status.phase == "Pending"
        # A node that fits joins: the pending pod is placed there without waiting out
        # its backoff.
        await store.create(make_node("huge", memory="16Gi"))
        await eventually(lambda: _all_bound_named(store, "big"), what="big bound")
    assert (await store.get(Pod, "big", "default")).spec.node_name == "huge"


async def _all_bound_named(store: Store, name: str) -> str | None:
    pod = await store.get(Pod, name, "default")
    return pod.spec.node_name if pod else None


async def test_requests_add_up_per_node(store: Store) -> None:
    await store.create(make_node("only", cpu="1"))
    for i in range(3):
        await store.create(make_pod(f"p-{i}", requests={"cpu": "400m"}))
    async with running(Scheduler(store, seed=3, initial_backoff=0.2).run()):
        await eventually(lambda: _count_bound(store, 2), what="two pods bound")
        names = {p.name for p in await _pods(store) if not p.spec.node_name}
        assert len(names) == 1
        (waiting,) = names
        msg = await eventually(lambda: _unschedulable(store, waiting), what="reason")
        assert msg == "0/1 nodes are available: 1 Insufficient cpu."
        # Deleting a bound pod frees room for the waiting one.
        bound = next(p for p in await _pods(store) if p.spec.node_name)
        await store.delete(Pod, bound.name, "default")
        await eventually(lambda: _all_bound_named(store, waiting), what="waiting pod bound")


async def _count_bound(store: Store, n: int) -> bool:
    return sum(1 for p in await _pods(store) if p.spec.node_name) == n


async def test_node_selector_taints_and_readiness(store: Store) -> None:
    await store.create(make_node("plain"))
    await store.create(
        make_node(
            "gpu",
            labels={"accel": "gpu"},
            taints=[{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}],
        )
    )
    await store.create(make_node("down", labels={"accel": "gpu"}, ready=False))
    await store.create(make_pod("wants-gpu", node_selector={"accel": "gpu"}))
    await store.create(
        make_pod(
            "tolerates",
            node_selector={"accel": "gpu"},
            tolerations=[
                {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
            ],
        )
    )
    for i in range(4):
        await store.create(make_pod(f"any-{i}"))
    async with running(Scheduler(store, seed=5, initial_backoff=0.2).run()):
        msg = await eventually(lambda: _unschedulable(store, "wants-gpu"), what="reason")
        assert msg == (
            "0/3 nodes are available: 1 node(s) didn't match Pod's node "
            "affinity/selector, 1 node(s) had untolerated taint {dedicated: gpu}, "
            "1 node(s) were not ready."
        )
        assert await eventually(lambda: _all_bound_named(store, "tolerates")) == "gpu"
        for i in range(4):
            assert await eventually(lambda i=i: _all_bound_named(store, f"any-{i}")) == "plain"


async def test_max_pods_per_node(store: Store) -> None:
    await store.create(make_node("tiny", pods=2))
    for i in range(3):
        await store.create(make_pod(f"p-{i}"))
    async with running(Scheduler(store, seed=1, initial_backoff=0.2).run()):
        await eventually(lambda: _count_bound(store, 2), what="two bound")
        waiting = next(p.name for p in await _pods(store) if not p.spec.node_name)
        msg = await eventually(lambda: _unschedulable(store, waiting), what="reason")
        assert msg == "0/1 nodes are available: 1 Too many pods."


def test_seeded_tie_break_is_repeatable_and_scores_prefer_the_emptier_node() -> None:
    nodes = [NodeInfo(make_node(f"n{i}")) for i in range(4)]
    pod = make_pod("x")
    a = [choose_node(pod, nodes, random.Random(7)).node for _ in range(5)]
    b = [choose_node(pod, nodes, random.Random(7)).node for _ in range(5)]
    assert a == b
    busy = NodeInfo(make_node("busy"))
    busy.add_pod(make_pod("y", requests={"cpu": "1", "memory": "2Gi"}))
    assert choose_node(pod, [busy, NodeInfo(make_node("idle"))], random.Random(1)).node == "idle"
    # An unreported resource is not a limit.
    bare = Node.model_validate(
        {
            "metadata": {"name": "bare"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    assert filter_node(make_pod("z", requests={"cpu": "64"}), NodeInfo(bare)) == []
