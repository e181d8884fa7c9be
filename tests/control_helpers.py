"""Builders and polling helpers shared by the control-plane tests.

The tests play the node runtimes' part: they write the Node objects and the
pod IPs and Ready conditions a real `corral node` would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from corral.api.objects import Node, Pod, PodIP
from corral.api.store import Store, now_iso
from corral.common.supervisor import cancel_and_wait
from corral.control.conditions import set_pod_condition
from tests import kit

T = TypeVar("T")


def make_node(
    name: str,
    cpu: str = "2",
    memory: str = "4Gi",
    pods: int = 110,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, Any]] | None = None,
) -> Node:
    return Node.model_validate(
        {
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, **(labels or {})},
            },
            "spec": {"taints": taints or []},
            "status": {
                "allocatable": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                "capacity": {"cpu": cpu, "memory": memory, "pods": str(pods)},
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "lastHeartbeatTime": now_iso(),
                        "lastTransitionTime": now_iso(),
                    }
                ],
            },
        }
    )


def make_pod(
    name: str,
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    requests: dict[str, str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> Pod:
    return Pod.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {
                "containers": [
                    {
                        "name": "main",
                        "command": ["sleep", "infinity"],
                        "ports": ports or [],
                        "resources": {"requests": requests or {}},
                    }
                ],
                **spec,
            },
        }
    )


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 30.0, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy (tests.kit.eventually)."""
    return await kit.eventually(check, what, timeout)


@contextlib.asynccontextmanager
async def running(*coros: Coroutine[Any, Any, Any]) -> AsyncIterator[None]:
    """Run daemons' `run()` coroutines for the body, then cancel them (also on failure)."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        if not await cancel_and_wait(tasks, 20.0):
            raise AssertionError("daemon tasks did not stop within 20s of cancellation")


async def set_pod_running(
    store: Store, name: str, ip: str, ready: bool = True, namespace: str = "default"
) -> Pod:
    """What a node runtime writes once the sandbox has an IP and the probes passed."""

    def change(p: Pod) -> Pod:
        p.status.phase = "Running"
        p.status.pod_ip = ip
        p.status.pod_ips = [PodIP(ip=ip)]
        set_pod_condition(p.status, "Ready", "True" if ready else "False")
        return p

    return await store.modify(Pod, name, namespace, change)
