"""Where a pod may run and where it should: the scheduler's filters and scores.

Pure functions over objects, so they are tested without a store. The reasons
are kube-scheduler's words, so its "0/3 nodes are available: 3 Insufficient
memory." reads the same here.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from corral.api.objects import Node, Pod, Taint, Toleration
from corral.control.resources import (
    Allocatable,
    Resources,
    node_allocatable,
    pod_nonzero_requests,
    pod_requests,
)

MAX_SCORE = 100


@dataclass
class NodeInfo:
    """A node and the sums of what the pods bound to it request."""

    node: Node
    requested: Resources = field(default_factory=Resources)
    nonzero_requested: Resources = field(default_factory=Resources)
    owners: Counter[str] = field(default_factory=Counter)  # controller uid -> its pods here

    @property
    def allocatable(self) -> Allocatable:
        return node_allocatable(self.node)

    def add_pod(self, pod: Pod) -> None:
        self.requested = self.requested + pod_requests(pod)
        self.nonzero_requested = self.nonzero_requested + pod_nonzero_requests(pod)
        if owner := controller_uid(pod):
            self.owners[owner] += 1


def controller_uid(pod: Pod) -> str | None:
    ref = next((r for r in pod.metadata.owner_references if r.controller), None)
    return ref.uid if ref is not None and ref.uid else None


def spread_scores(pod: Pod, infos: list[NodeInfo]) -> list[int]:
    """kube-scheduler's default spreading: 0..100 per node, higher where fewer pods of the
    pod's own controller (ReplicationController, Deployment) already run, so replicas
    land on different nodes when they can (CoreDNS's two replicas, say)."""
    owner = controller_uid(pod)
    counts = [info.owners[owner] if owner else 0 for info in infos]
    most = max(counts, default=0)
    if most == 0:
        return [MAX_SCORE] * len(infos)
    return [MAX_SCORE * (most - c) // most for c in counts]


def tolerates(toleration: Toleration, taint: Taint) -> bool:
    if toleration.effect is not None and toleration.effect != taint.effect:
        return False
    if toleration.key is None or toleration.key == "":
        return toleration.operator == "Exists"
    if toleration.key != taint.key:
        return False
    if toleration.operator == "Exists":
        return True
    return (toleration.value or "") == (taint.value or "")


def untolerated_taint(pod: Pod, node: Node) -> Taint | None:
    for taint in node.spec.taints:
        if taint.effect == "PreferNoSchedule":
            continue
        if not any(tolerates(t, taint) for t in pod.spec.tolerations):
            return taint
    return None


def filter_node(pod: Pod, info: NodeInfo) -> list[str]:
    """Why `pod` cannot run on this node (kube-scheduler's reasons); empty if it can."""
    node = info.node
    if node.spec.unschedulable:
        return ["node(s) were unschedulable"]
    if not node.ready:
        return ["node(s) were not ready"]
    if any(node.metadata.labels.get(k) != v for k, v in pod.spec.node_selector.items()):
        return ["node(s) didn't match Pod's node affinity/selector"]
    taint = untolerated_taint(pod, node)
    if taint is not None:
        return [f"node(s) had untolerated taint {{{taint.key}: {taint.value or ''}}}"]
    want, have, alloc = pod_requests(pod), info.requested, info.allocatable
    reasons = []
    if have.pods + 1 > alloc.pods:
        reasons.append("Too many pods")
    if alloc.cpu is not None and want.cpu and have.cpu + want.cpu > alloc.cpu:
        reasons.append("Insufficient cpu")
    if alloc.memory is not None and want.memory and have.memory + want.memory > alloc.memory:
        reasons.append("Insufficient memory")
    return reasons


def _fraction(requested: int, allocatable: int | None) -> float | None:
    if not allocatable:
        return None
    return min(requested / allocatable, 1.0)


def score_node(pod: Pod, info: NodeInfo) -> int:
    """Least-allocated plus balanced-allocation, each 0..100, on the requests after placement.

    Resources the node does not report are left out; a node reporting neither
    cpu nor memory is scored on its pod count.
    """
    want, alloc = pod_nonzero_requests(pod), info.allocatable
    after = info.nonzero_requested + want
    fractions = [
        f
        for f in (_fraction(after.cpu, alloc.cpu), _fraction(after.memory, alloc.memory))
        if f is not None
    ]
    if not fractions:
        fractions = [min((info.requested.pods + 1) / alloc.pods, 1.0)]
    least = sum((1 - f) * MAX_SCORE for f in fractions) / len(fractions)
    balanced = MAX_SCORE
    if len(fractions) == 2:
        balanced = (1 - abs(fractions[0] - fractions[1]) / 2) * MAX_SCORE
    return int(least) + int(balanced)


@dataclass
class Decision:
    node: str | None
    message: str = ""


def unschedulable_message(total: int, reasons: Counter[str]) -> str:
    if total == 0:
        return "no nodes available to schedule pods"
    parts = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: x[0]))
    return f"0/{total} nodes are available: {parts}."


def choose_node(pod: Pod, infos: list[NodeInfo], rng: random.Random) -> Decision:
    """Filter, score, and pick the best node (ties broken by `rng`)."""
    reasons: Counter[str] = Counter()
    feasible = []
    for info in infos:
        why = filter_node(pod, info)
        if why:
            reasons.update(why)
        else:
            feasible.append(info)
    if not feasible:
        return Decision(None, unschedulable_message(len(infos), reasons))
    spread = spread_scores(pod, feasible)
    scored = [
        (score_node(pod, i) + sp, i.node.name) for i, sp in zip(feasible, spread, strict=True)
    ]
    best = max(s for s, _ in scored)
    top = sorted(name for s, name in scored if s == best)
    return Decision(rng.choice(top))
