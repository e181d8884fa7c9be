"""corral.control.placement as pure functions: tolerations, filters, scores, choice.

No etcd, no scheduler loop: objects in, decisions out. The scheduler's own
behaviour against a store is in test_scheduler.py.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from corral.api.objects import Node, OwnerReference, Pod, Taint, Toleration
from corral.control.placement import (
    MAX_SCORE,
    NodeInfo,
    choose_node,
    filter_node,
    score_node,
    spread_scores,
    tolerates,
    unschedulable_message,
    untolerated_taint,
)
from corral.control.resources import NONZERO_CPU_MILLIS, NONZERO_MEMORY, pod_requests
from tests.control_helpers import make_node, make_pod


def tol(**kw: Any) -> Toleration:
    return Toleration.model_validate(kw)


def taint(key: str = "dedicated", value: str | None = "gpu", effect: str = "NoSchedule") -> Taint:
    return Taint.model_validate({"key": key, "value": value, "effect": effect})


def pod_with(containers: list[dict[str, Any]], **spec: Any) -> Pod:
    return Pod.model_validate(
        {
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": containers, **spec},
        }
    )


def info(node: Node, *pods: Pod) -> NodeInfo:
    i = NodeInfo(node)
    for p in pods:
        i.add_pod(p)
    return i


# ------------------------------------------------------------ taints and tolerations


@pytest.mark.parametrize(
    ("toleration", "t", "ok"),
    [
        ({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}, taint(), True),
        ({"key": "dedicated", "value": "cpu", "effect": "NoSchedule"}, taint(), False),
        ({"key": "dedicated", "value": "gpu"}, taint(), True),  # no effect: every effect
        ({"key": "dedicated", "value": "gpu", "effect": "NoExecute"}, taint(), False),
        ({"key": "dedicated", "operator": "Exists"}, taint(), True),
        ({"key": "other", "operator": "Exists"}, taint(), False),
        ({"operator": "Exists"}, taint(), True),  # no key + Exists: tolerates everything
        ({"key": "", "operator": "Exists", "effect": "NoExecute"}, taint(), False),
        ({"key": "dedicated"}, taint(value=None), True),  # Equal with no value on both
        ({"key": "dedicated"}, taint(), False),
    ],
)
def test_tolerates(toleration: dict[str, Any], t: Taint, ok: bool) -> None:
    assert tolerates(tol(**toleration), t) is ok


def test_a_toleration_without_a_key_must_be_exists() -> None:
    with pytest.raises(ValidationError, match="without a key needs operator Exists"):
        tol(operator="Equal", value="gpu")


def test_untolerated_taint_skips_prefer_no_schedule_and_names_the_first() -> None:
    node = make_node(
        "n",
        taints=[
            {"key": "soft", "effect": "PreferNoSchedule"},
            {"key": "a", "value": "1", "effect": "NoSchedule"},
            {"key": "b", "effect": "NoExecute"},
        ],
    )
    assert untolerated_taint(make_pod("p"), node).key == "a"  # type: ignore[union-attr]
    tolerant = make_pod("p", tolerations=[{"key": "a", "operator": "Exists"}])
    assert untolerated_taint(tolerant, node).key == "b"  # type: ignore[union-attr]
    everything = make_pod("p", tolerations=[{"operator": "Exists"}])
    assert untolerated_taint(everything, node) is None
    only_soft = make_node("s", taints=[{"key": "soft", "effect": "PreferNoSchedule"}])
    assert untolerated_taint(make_pod("p"), only_soft) is None


# ------------------------------------------------------------ filters


def test_filter_reasons_are_kube_schedulers_words() -> None:
    pod = make_pod("p")
    cordoned = make_node("c")
    cordoned.spec.unschedulable = True
    assert filter_node(pod, info(cordoned)) == ["node(s) were unschedulable"]
    assert filter_node(pod, info(make_node("nr", ready=False))) == ["node(s) were not ready"]
    picky = make_pod("p", nodeSelector={"disk": "ssd"})
    assert filter_node(picky, info(make_node("hdd", labels={"disk": "hdd"}))) == [
        "node(s) didn't match Pod's node affinity/selector"
    ]
    assert filter_node(picky, info(make_node("ssd", labels={"disk": "ssd"}))) == []
    tainted = make_node("t", taints=[{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}])
    assert filter_node(pod, info(tainted)) == ["node(s) had untolerated taint {dedicated: gpu}"]
    bare_taint = make_node("t", taints=[{"key": "maint", "effect": "NoExecute"}])
    assert filter_node(pod, info(bare_taint)) == ["node(s) had untolerated taint {maint: }"]


def test_resource_fit_counts_what_is_bound_and_allows_an_exact_fit() -> None:
    node = make_node("n", cpu="1", memory="1Gi", pods=3)
    half = make_pod("h", requests={"cpu": "500m", "memory": "512Mi"})
    assert filter_node(half, info(node, half)) == []  # 500m + 500m == 1 cpu: fits exactly
    assert filter_node(half, info(node, half, half)) == ["Insufficient cpu", "Insufficient memory"]
    small = make_pod("s", requests={"cpu": "1m"})
    assert filter_node(small, info(node, small, small)) == []
    assert filter_node(small, info(node, small, small, small)) == ["Too many pods"]
    big = make_pod("b", requests={"memory": "2Gi"})
    assert filter_node(big, info(node)) == ["Insufficient memory"]
    # A pod that requests nothing fits anywhere there is room for a pod.
    assert filter_node(make_pod("z"), info(node, half, half)) == []


def test_requests_are_limits_when_only_limits_are_set_and_add_up_over_containers() -> None:
    pod = pod_with(
        [
            {
                "name": "a",
                "command": ["true"],
                "resources": {"limits": {"cpu": "300m", "memory": "100Mi"}},
            },
            {
                "name": "b",
                "command": ["true"],
                "resources": {"requests": {"cpu": "200m"}, "limits": {"cpu": "1"}},
            },
        ]
    )
    r = pod_requests(pod)
    assert (r.cpu, r.memory, r.pods) == (500, 100 * 2**20, 1)
    node = make_node("n", cpu="400m", memory="1Gi")
    assert filter_node(pod, info(node)) == ["Insufficient cpu"]


# ------------------------------------------------------------ scores


def test_scores_are_least_allocated_plus_balanced() -> None:
    node = make_node("n", cpu="1", memory="1Gi")
    pod = make_pod("p", requests={"cpu": "500m", "memory": "256Mi"})
    # cpu 0.5, memory 0.25: least (50 + 75) / 2 = 62; balanced (1 - 0.25 / 2) * 100 = 87
    assert score_node(pod, info(node)) == 62 + 87
    even = make_pod("e", requests={"cpu": "500m", "memory": "512Mi"})
    assert score_node(even, info(node)) == 50 + MAX_SCORE  # perfectly balanced
    # Past the node's size a fraction counts as full, not as a negative score.
    huge = make_pod("x", requests={"cpu": "4", "memory": "4Gi"})
    assert score_node(huge, info(node)) == 0 + MAX_SCORE


def test_pods_without_requests_score_with_kube_schedulers_defaults() -> None:
    node = make_node("n", cpu="1", memory=str(2 * NONZERO_MEMORY))
    cpu_f, mem_f = NONZERO_CPU_MILLIS / 1000, 0.5
    least = int(((1 - cpu_f) + (1 - mem_f)) / 2 * MAX_SCORE)
    balanced = int((1 - abs(cpu_f - mem_f) / 2) * MAX_SCORE)
    assert score_node(make_pod("p"), info(node)) == least + balanced
    # ... so a node with request-less pods on it scores lower than an empty one.
    assert score_node(make_pod("p"), info(node, make_pod("q"))) < least + balanced


def test_a_node_reporting_no_cpu_or_memory_is_scored_on_its_pod_count() -> None:
    bare = Node.model_validate(
        {
            "metadata": {"name": "bare"},
            "status": {
                "allocatable": {"pods": "4"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )
    assert score_node(make_pod("p"), info(bare)) == 75 + MAX_SCORE  # 1 of 4 pods
    assert score_node(make_pod("p"), info(bare, make_pod("a"))) == 50 + MAX_SCORE


# ------------------------------------------------------------ choose_node


def test_no_feasible_node_gives_kube_schedulers_message() -> None:
    nodes = [
        info(make_node("a", cpu="1")),
        info(make_node("b", ready=False)),
        info(make_node("c", ready=False)),
    ]
    d = choose_node(make_pod("p", requests={"cpu": "2"}), nodes, random.Random(0))
    assert d.node is None
    assert d.message == ("0/3 nodes are available: 1 Insufficient cpu, 2 node(s) were not ready.")
    assert choose_node(make_pod("p"), [], random.Random(0)).message == (
        "no nodes available to schedule pods"
    )
    assert unschedulable_message(2, Counter({"b": 1, "a": 2})) == (
        "0/2 nodes are available: 2 a, 1 b."
    )


def test_choose_node_takes_the_best_score_and_breaks_ties_only_among_the_best() -> None:
    busy = make_pod("busy", requests={"cpu": "1", "memory": "1Gi"})
    nodes = [
        info(make_node("loaded"), busy),
        info(make_node("idle-1")),
        info(make_node("idle-2")),
        info(make_node("cordoned")),
    ]
    nodes[3].node.spec.unschedulable = True
    picked = {choose_node(make_pod("p"), nodes, random.Random(seed)).node for seed in range(40)}
    assert picked == {"idle-1", "idle-2"}
    # The same seed, the same answer.
    runs = [
        [choose_node(make_pod("p"), nodes, random.Random(3)).node for _ in range(3)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_placing_one_pod_after_another_spreads_them() -> None:
    nodes = [info(make_node(f"n{i}")) for i in range(3)]
    rng = random.Random(5)
    for i in range(9):
        pod = make_pod(f"web-{i}", requests={"cpu": "100m", "memory": "128Mi"})
        d = choose_node(pod, nodes, rng)
        next(n for n in nodes if n.node.name == d.node).add_pod(pod)
    assert sorted(n.requested.pods for n in nodes) == [3, 3, 3]
    # A node that already carries load gets the next pods last.
    nodes = [info(make_node("full"), *[make_pod(f"x{i}") for i in range(4)])]
    nodes += [info(make_node("empty"))]
    placed = []
    for i in range(4):
        pod = make_pod(f"p{i}")
        d = choose_node(pod, nodes, rng)
        placed.append(d.node)
        next(n for n in nodes if n.node.name == d.node).add_pod(pod)
    assert placed == ["empty"] * 4


# ------------------------------------------------------------ spreading a controller's pods


def owned(name: str, uid: str, **kw: Any) -> Pod:
    p = make_pod(name, **kw)
    p.metadata.owner_references = [
        OwnerReference(api_version="apps/v1", kind="Deployment", name="d", uid=uid, controller=True)
    ]
    return p


def test_replicas_of_one_controller_spread_over_nodes() -> None:
    # node-a is emptier by requests, yet it already runs the controller's replica:
    # the next replica goes to node-b (kube-scheduler's default spreading).
    busy = make_pod("big", requests={"cpu": "1500m", "memory": "3Gi"})
    a = info(make_node("node-a", cpu="8", memory="16Gi"), owned("dns-1", "u1"))
    b = info(make_node("node-b"), busy)
    assert choose_node(owned("dns-2", "u1"), [a, b], random.Random(1)).node == "node-b"
    # Another controller's pods, or pods without one, are not pushed away by it.
    assert spread_scores(owned("x", "u2"), [a, b]) == [MAX_SCORE, MAX_SCORE]
    assert spread_scores(make_pod("y"), [a, b]) == [MAX_SCORE, MAX_SCORE]
    assert spread_scores(owned("dns-3", "u1"), [a, b]) == [0, MAX_SCORE]
