"""Setting status conditions the way the API server's helpers do."""

from __future__ import annotations

from corral.api.objects import PodCondition, PodStatus
from corral.api.store import now_iso


def set_pod_condition(
    status: PodStatus, type_: str, value: str, reason: str | None = None, message: str | None = None
) -> bool:
    """Set (or add) a condition; True if anything changed. The transition time moves only
    when the status flips."""
    cur = status.condition(type_)
    if cur is None:
        status.conditions.append(
            PodCondition(
                type=type_,
                status=value,
                reason=reason,
                message=message,  # type: ignore[arg-type]
                last_transition_time=now_iso(),
            )
        )
        return True
    if (cur.status, cur.reason, cur.message) == (value, reason, message):
        return False
    if cur.status != value:
        cur.last_transition_time = now_iso()
    cur.status, cur.reason, cur.message = value, reason, message  # type: ignore[assignment]
    return True
