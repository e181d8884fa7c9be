"""Finalizers and deletion, one rule for every writer (the API server, the garbage
collector, the node runtime): an object marked for deletion (`deletionTimestamp`)
stays while it has finalizers and goes when the last is removed, except a pod still
running on its node, which its node removes once its containers have stopped.

`orphan` and `foregroundDeletion` are the garbage collector's (control/
garbagecollector.py): a delete with `propagationPolicy: Orphan` or `Foreground`
adds them, and the collector removes them once the dependents are released or gone.
"""

from __future__ import annotations

from typing import Any

ORPHAN = "orphan"
FOREGROUND = "foregroundDeletion"
POLICY_FINALIZERS = {"Orphan": ORPHAN, "Foreground": FOREGROUND}


def removable(obj: dict[str, Any]) -> bool:
    """Whether a write leaving `obj` (wire form) should remove it instead."""
    md = obj.get("metadata") or {}
    if not md.get("deletionTimestamp") or md.get("finalizers"):
        return False
    if obj.get("kind") == "Pod" and (obj.get("spec") or {}).get("nodeName"):
        return md.get("deletionGracePeriodSeconds") == 0  # its node is done with it
    return True
