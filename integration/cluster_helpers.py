"""Small helpers the whole-cluster tests share."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


def wait_for(
    cond: Callable[[], Any], what: str, timeout: float = 120.0, interval: float = 0.3
) -> Any:
    """Poll `cond` until it returns something truthy (returned); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def pods_of(cluster: Any, app: str) -> list[dict]:
    """The pods `corral run APP` made (label run=APP), as JSON dicts."""
    r = cluster.corral("get", "pods", "-l", f"run={app}", "-o", "json")
    assert r.returncode == 0, r.stderr
    if not r.stdout.strip():
        return []
    data = json.loads(r.stdout)
    return data["items"] if data.get("kind") == "List" else [data]
