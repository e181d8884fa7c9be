"""Ending pods: graceful (the node stops them) or at once (no node will)."""

from __future__ import annotations

import contextlib
from datetime import datetime

from corral.api.objects import Pod
from corral.api.store import NotFound, Store, now_iso


def terminating(pod: Pod) -> bool:
    return pod.metadata.deletion_timestamp is not None


def finished(pod: Pod) -> bool:
    return pod.status.phase in ("Succeeded", "Failed")


def parse_time(ts: str | None) -> float | None:
    """An RFC 3339 timestamp as epoch seconds; None if absent or malformed."""
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def delete_pod(
    store: Store, pod: Pod, graceful: bool = True, grace: int | None = None
) -> None:
    """Mark `pod` terminating so its node stops it within its grace period (`grace`
    seconds, else the pod's own), or, when no node will (unscheduled, node gone) or
    `graceful` is False, remove it at once."""
    if not graceful or not pod.spec.node_name:
        await store.delete(Pod, pod.name, pod.namespace)
        return

    def mark(p: Pod) -> Pod | None:
        if p.metadata.deletion_timestamp:
            return None
        p.metadata.deletion_timestamp = now_iso()
        p.metadata.deletion_grace_period_seconds = (
            grace if grace is not None else p.spec.termination_grace_period_seconds
        )
        return p

    with contextlib.suppress(NotFound):
        await store.modify(Pod, pod.name, pod.namespace, mark)
