"""Small helpers the whole-cluster tests share."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests import kit


def wait_for(
    cond: Callable[[], Any], what: str, timeout: float = 120.0, interval: float = 0.3
) -> Any:
    """Poll `cond` until it returns something truthy (returned); fail naming `what`."""
    return kit.wait_for(cond, what, timeout, interval)


def pods_of(cluster: Any, app: str) -> list[dict]:
    """The pods `corral run APP` made (label run=APP), as JSON dicts."""
    r = cluster.corral("get", "pods", "-l", f"run={app}", "-o", "json")
    assert r.returncode == 0, r.stderr
    if not r.stdout.strip():
        return []
    data = json.loads(r.stdout)
    return data["items"] if data.get("kind") == "List" else [data]
