"""Deployment rollouts: when the pod template changes, replace old pods with new ones.

Pods of a Deployment carry `pod-template-hash` (a hash of the template they
were made from); pods with another hash are old. RollingUpdate (the default)
follows kube's arithmetic: at most `replicas + maxSurge` pods exist, and old
pods are only removed while `replicas - maxUnavailable` would stay available
(new pods count as unavailable until they are Ready for minReadySeconds).
Recreate removes every old pod, and waits for them to be gone, before making
new ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.api.objects import Deployment, Pod, PodTemplateSpec

TEMPLATE_HASH_LABEL = "pod-template-hash"
DEFAULT_SURGE = DEFAULT_UNAVAILABLE = "25%"


def template_hash(template: PodTemplateSpec) -> str:
    data = json.dumps(
        template.model_dump(by_alias=True, exclude_none=True, mode="json"),
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(data.encode()).hexdigest()[:10]


def _count(value: Any, replicas: int, round_up: bool, field: str) -> int:
    """An int, or a percentage of replicas (surge rounds up, unavailable down)."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a number or a percentage, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field} must not be negative")
        return value
    text = str(value).strip()
    if not text.endswith("%") or not text[:-1].isdigit():
        raise ValueError(f"{field} {value!r} must be a number or a percentage like 25%")
    share = replicas * int(text[:-1]) / 100
    return math.ceil(share) if round_up else math.floor(share)


@dataclass(frozen=True)
class Strategy:
    type: str = "RollingUpdate"
    max_surge: int = 1
    max_unavailable: int = 0


def strategy(dep: Deployment) -> Strategy:
    """The Deployment's strategy; ValueError names the bad field."""
    raw = dep.spec.strategy or {}
    kind = raw.get("type", "RollingUpdate")
    if kind not in ("RollingUpdate", "Recreate"):
        raise ValueError(f"spec.strategy.type {kind!r} must be RollingUpdate or Recreate")
    if kind == "Recreate":
        return Strategy("Recreate", 0, 0)
    ru = raw.get("rollingUpdate") or {}
    n = dep.spec.replicas
    surge = _count(
        ru.get("maxSurge", DEFAULT_SURGE), n, True, "spec.strategy.rollingUpdate.maxSurge"
    )
    unavailable = _count(
        ru.get("maxUnavailable", DEFAULT_UNAVAILABLE),
        n,
        False,
        "spec.strategy.rollingUpdate.maxUnavailable",
    )
    if surge == 0 and unavailable == 0:
        unavailable = 1  # kube refuses both zero; never stall a rollout on it
    return Strategy("RollingUpdate", surge, unavailable)


@dataclass
class Step:
    create: int
    delete: list[Pod]


def rollout_step(
    replicas: int,
    strat: Strategy,
    new: list[Pod],
    old: list[Pod],
    old_terminating: int,
    is_available: Callable[[Pod], bool],
    rank: Callable[[Pod], Any],
) -> Step:
    """What to do now while old pods exist (`old` active, `old_terminating` draining)."""
    if strat.type == "Recreate":
        if old:
            return Step(0, list(old))
        if old_terminating:
            return Step(0, [])  # new pods only once every old one is gone
        return Step(max(0, replicas - len(new)), [])
    total = len(new) + len(old)
    create = max(0, min(replicas - len(new), replicas + strat.max_surge - total))
    min_available = replicas - strat.max_unavailable
    new_unavailable = sum(not is_available(p) for p in new)
    removable = total - min_available - new_unavailable
    delete = sorted(old, key=rank)[: max(0, min(len(old), removable))]
    return Step(create, delete)
