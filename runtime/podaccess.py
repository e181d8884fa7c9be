"""Into a running pod: which container, which log file, which command line for exec.

One implementation for every way in: the node's API (`runtime/nodeapi.py`, what the
API server's `log` and `exec` subresources reach) and `corral logs`/`corral exec` on
the node's own machine. The runtime records in the pod's annotations where its files
are (`corral.dev/runtime`: podDir) and each container's PID 1 (`corral.dev/containers`).
Errors carry kubelet's and kube-apiserver's wording, so kubectl users read what they
are used to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from corral.api.objects import Pod
from corral.api.podcontainers import PodAccessError, restarts
from corral.node.procs import start_time
from corral.runtime.containers import DEFAULT_PATH, exec_argv
from corral.runtime.podstatus import ANN_CONTAINERS, ANN_RUNTIME


def runtime_info(pod: Pod) -> dict[str, Any]:
    """{node, pid, podDir} the runtime recorded; an error while no node has started it."""
    raw = pod.metadata.annotations.get(ANN_RUNTIME)
    if not raw:
        node = pod.spec.node_name
        where = "not scheduled" if not node else f"node {node} has not started it"
        raise PodAccessError(f'pod "{pod.name}" is not running yet ({where}): try again when it is')
    info: dict[str, Any] = json.loads(raw)
    return info


def log_path(pod: Pod, container: str, previous: bool, pod_dir: str | None = None) -> str:
    """The log file of the container's current instance, or of the one before it.

    `pod_dir`: the pod's folder as the caller sees it (default: the recorded path)."""
    info = runtime_info(pod)
    instance = restarts(pod, container) - (1 if previous else 0)
    if instance < 0:
        raise PodAccessError(
            f'previous terminated container "{container}" in pod "{pod.name}" not found'
        )
    return os.path.join(pod_dir or info["podDir"], "logs", container, f"{instance}.log")


def _entry(pod: Pod, container: str) -> dict[str, Any] | None:
    """The runtime's record of the container's PID 1 ({pid, started, log})."""
    raw = pod.metadata.annotations.get(ANN_CONTAINERS)
    entry: dict[str, Any] | None = (json.loads(raw) if raw else {}).get(container)
    return entry


def _running_here(entry: dict[str, Any]) -> bool:
    return start_time(int(entry["pid"])) == int(entry["started"])


def runs_here(pod: Pod, container: str) -> bool:
    """Whether the container's PID 1 is a process of this machine (the pod's node is
    here): its recorded pid runs, with the recorded start time."""
    entry = _entry(pod, container)
    return entry is not None and _running_here(entry)


def tail_lines(data: bytes, n: int) -> bytes:
    """The last `n` lines of `data` (kubectl's --tail; 0: none)."""
    return b"".join(data.splitlines(keepends=True)[-n:]) if n else b""


@dataclass(frozen=True)
class ExecCommand:
    argv: list[str]
    env: dict[str, str]


def exec_command(
    pod: Pod, container: str, command: list[str], pod_dir: str | None = None
) -> ExecCommand:
    """The command line that runs `command` in the container's namespaces, root and
    cgroups with its capabilities and user, and its environment. Blocking (reads the
    container's spec)."""
    if not command:
        raise PodAccessError("you must specify at least one command for the container")
    entry = _entry(pod, container)
    if entry is None:
        runtime_info(pod)
        raise PodAccessError(
            f"container {container} is not running in pod {pod.name} (phase {pod.status.phase})"
        )
    if not _running_here(entry):
        raise PodAccessError(
            f"container {container} of pod {pod.name} is not running on this machine "
            f"(node {pod.spec.node_name}); it may have just restarted, try again"
        )
    spec = next(c for c in [*pod.spec.containers, *pod.spec.init_containers] if c.name == container)
    env = {
        "PATH": DEFAULT_PATH,
        "HOSTNAME": pod.spec.hostname or pod.name,
        **{e.name: e.value for e in spec.env},
    }
    try:
        argv = exec_argv(
            pod_dir or runtime_info(pod)["podDir"], container, int(entry["pid"]), command
        )
    except OSError as e:
        raise PodAccessError(
            f"cannot read the spec of container {container} of pod {pod.name}: {e}", 500
        ) from None
    return ExecCommand(argv, env)
