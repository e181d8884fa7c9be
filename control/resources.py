"""Pod resource requests and node capacity in integer units (millicores, bytes, pods)."""

from __future__ import annotations

from dataclasses import dataclass

from corral.api.objects import Node, Pod
from corral.api.quantity import cpu_millis, memory_bytes

DEFAULT_MAX_PODS = 110
# What kube-scheduler assumes a container without requests uses, for scoring
# only: without it, pods that request nothing would all pile onto one node.
NONZERO_CPU_MILLIS = 100
NONZERO_MEMORY = 200 * 1024 * 1024


@dataclass
class Resources:
    cpu: int = 0  # millicores
    memory: int = 0  # bytes
    pods: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.memory + other.memory, self.pods + other.pods)


def _sum_requests(pod: Pod, default_cpu: int, default_memory: int) -> Resources:
    """Per container its requests, or its limits when it sets only those, else the defaults."""
    total = Resources(pods=1)
    for c in pod.spec.containers:
        req, lim = c.resources.requests, c.resources.limits
        cpu = req.get("cpu", lim.get("cpu"))
        mem = req.get("memory", lim.get("memory"))
        total.cpu += cpu_millis(cpu) if cpu is not None else default_cpu
        total.memory += memory_bytes(mem) if mem is not None else default_memory
    return total


def pod_requests(pod: Pod) -> Resources:
    """What the pod asks for: per container its requests, or its limits when it sets only those."""
    return _sum_requests(pod, 0, 0)


def pod_nonzero_requests(pod: Pod) -> Resources:
    """Requests with kube-scheduler's defaults filled in, used to score nodes."""
    return _sum_requests(pod, NONZERO_CPU_MILLIS, NONZERO_MEMORY)


@dataclass
class Allocatable:
    """What a node offers pods; None for a resource the node does not report (no limit)."""

    cpu: int | None
    memory: int | None
    pods: int


def node_allocatable(node: Node) -> Allocatable:
    """status.allocatable, falling back to status.capacity, then to no limit (110 pods)."""
    st = node.status

    def pick(name: str) -> str | int | float | None:
        return st.allocatable.get(name, st.capacity.get(name))

    cpu, mem, pods = pick("cpu"), pick("memory"), pick("pods")
    return Allocatable(
        cpu=cpu_millis(cpu) if cpu is not None else None,
        memory=memory_bytes(mem) if mem is not None else None,
        pods=int(memory_bytes(pods)) if pods is not None else DEFAULT_MAX_PODS,
    )


def format_cpu(millis: int) -> str:
    return f"{millis // 1000}" if millis % 1000 == 0 else f"{millis}m"


def format_memory(n: int) -> str:
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
