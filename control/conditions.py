"""Setting status conditions the way the API server's helpers do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.api.objects import PodCondition, PodStatus
from corral.api.store import now_iso


def set_condition(
    conditions: list[Any],
    make: Callable[..., Any],
    type_: str,
    value: str,
    reason: str | None = None,
    message: str | None = None,
) -> bool:
    """Set (or add, built by `make`) the condition `type_` in `conditions`; True if
    anything changed. The transition time moves only when the status flips."""
    cur = next((c for c in conditions if c.type == type_), None)
    if cur is None:
        conditions.append(
            make(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now_iso(),
            )
        )
        return True
    if (cur.status, cur.reason, cur.message) == (value, reason, message):
        return False
    if cur.status != value:
        cur.last_transition_time = now_iso()
    cur.status, cur.reason, cur.message = value, reason, message
    return True


def set_pod_condition(
    status: PodStatus, type_: str, value: str, reason: str | None = None, message: str | None = None
) -> bool:
    """A Pod's condition, as `set_condition`."""
    return set_condition(status.conditions, PodCondition, type_, value, reason, message)
