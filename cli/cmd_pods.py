"""`corral logs POD [-c C] [-f] [-p]` and `corral exec POD [-c C] -- CMD`: into a pod's containers.

Both run on the host of the local cluster (or on the pod's node): the runtime
records in the pod's annotations where its files are (`corral.dev/runtime`) and
each container's PID 1 (`corral.dev/containers`); exec enters that process's
namespaces through the container shim, with the container's own capabilities,
user and no_new_privs (read from its spec in the pod's directory), and logs read
the per-container log file; both through the runtime's view of the filesystem
(/proc/<runtime pid>/root).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from corral.api.objects import Pod
from corral.cli.common import CLIError, add_command_argument, run, store_from_args
from corral.node.procs import start_time
from corral.runtime.containers import DEFAULT_PATH, exec_argv
from corral.runtime.podstatus import ANN_CONTAINERS, ANN_RUNTIME


def register(sub: Any) -> None:
    p = sub.add_parser(
        "logs",
        help="print the logs of a container in a pod",
        usage="corral logs POD [-n NAMESPACE] [-c CONTAINER] [-f] [-p] [--tail N]",
    )
    p.add_argument("pod", metavar="POD")
    p.add_argument("-c", "--container", default=None)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument(
        "-p",
        "--previous",
        action="store_true",
        help="the logs of the previous (restarted) instance",
    )
    p.add_argument("--tail", type=int, default=-1, metavar="N", help="only the last N lines")
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "exec",
        help="run a command in a running container of a pod",
        usage="corral exec POD [-n NAMESPACE] [-c CONTAINER] -- CMD [ARGS...]",
    )
    p.add_argument("pod", metavar="POD")
    p.add_argument("-c", "--container", default=None)
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument(
        "-i",
        "--stdin",
        action="store_true",
        help="accepted for kubectl habit; stdin is always passed through",
    )
    p.add_argument("-t", "--tty", action="store_true", help="accepted for kubectl habit")
    add_command_argument(p, "CMD ARGS")
    p.set_defaults(func=cmd_exec)


async def _get_pod(args: argparse.Namespace) -> Pod:
    async with store_from_args(args) as store:
        pod = await store.get(Pod, args.pod, args.namespace)
    if pod is None:
        raise CLIError(
            f"pod {args.namespace}/{args.pod} not found; list pods with `corral get pods`"
        )
    return pod


def _container(pod: Pod, name: str | None) -> str:
    names = [c.name for c in pod.spec.containers]
    if name is None:
        if len(names) > 1:
            raise CLIError(
                f"pod {pod.name} has several containers ({', '.join(names)}); choose one with -c"
            )
        return names[0]
    inits = [c.name for c in pod.spec.init_containers]  # `-c INIT` shows an init container's
    if name not in names + inits:
        raise CLIError(
            f"pod {pod.name} has no container {name!r} (it has: {', '.join(names + inits)})"
        )
    return name


def _status_of(pod: Pod, container: str) -> Any:
    sts = [*pod.status.container_statuses, *pod.status.init_container_statuses]
    return next((c for c in sts if c.name == container), None)


def _runtime_info(pod: Pod) -> dict[str, Any]:
    raw = pod.metadata.annotations.get(ANN_RUNTIME)
    if not raw:
        node = pod.spec.node_name
        raise CLIError(
            f"pod {pod.name} has not been started by a node yet "
            f"({'not scheduled' if not node else 'node ' + node + ' has not run it'})"
        )
    return json.loads(raw)


def _pod_dir(pod: Pod) -> str:
    """The pod's directory as this process reaches it (through the runtime's root)."""
    info = _runtime_info(pod)
    pid = info.get("pid")
    if isinstance(pid, int) and start_time(pid) is not None:
        via = f"/proc/{pid}/root{info['podDir']}"
        if os.path.isdir(via):
            return via
    return info["podDir"]


def _log_file(pod: Pod, container: str, previous: bool) -> str:
    info = _runtime_info(pod)
    status = _status_of(pod, container)
    restarts = status.restart_count if status else 0
    instance = restarts - 1 if previous else restarts
    if instance < 0:
        raise CLIError(
            f"container {container} of pod {pod.name} has not restarted: there are no previous logs"
        )
    rel = os.path.join(info["podDir"], "logs", container, f"{instance}.log")
    candidates = [rel]
    pid = info.get("pid")
    if isinstance(pid, int) and start_time(pid) is not None:
        candidates.insert(0, f"/proc/{pid}/root{rel}")
    for path in candidates:
        if os.path.exists(path):
            return path
    raise CLIError(
        f"no logs for container {container} of pod {pod.name} on this machine "
        f"(node {info.get('node')}; run `corral logs` where that node runs)"
    )


def cmd_logs(args: argparse.Namespace) -> int:
    pod = run(lambda: _get_pod(args))
    container = _container(pod, args.container)
    path = _log_file(pod, container, args.previous)
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        data = f.read()
        if args.tail >= 0:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-args.tail :]) if args.tail else b""
        out.write(data)
        out.flush()
        if not args.follow or args.previous:
            return 0
        last_check = time.monotonic()
        try:
            while True:
                chunk = f.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                    continue
                if time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    cur = run(lambda: _maybe_pod(args))
                    if cur is None or cur.metadata.uid != pod.metadata.uid:
                        return 0
                    st = _status_of(cur, container)
                    if (
                        st is None
                        or "running" not in st.state
                        or st.restart_count != _restarts(pod, container)
                    ):
                        out.write(f.read())
                        out.flush()
                        return 0
                time.sleep(0.2)
        except KeyboardInterrupt:
            return 0


def _restarts(pod: Pod, container: str) -> int:
    st = _status_of(pod, container)
    return st.restart_count if st else 0


async def _maybe_pod(args: argparse.Namespace) -> Pod | None:
    async with store_from_args(args) as store:
        return await store.get(Pod, args.pod, args.namespace)


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.cmd)
    if not argv:
        raise CLIError("no command given: corral exec POD -- CMD [ARGS...]")
    pod = run(lambda: _get_pod(args))
    container = _container(pod, args.container)
    raw = pod.metadata.annotations.get(ANN_CONTAINERS)
    procs = json.loads(raw) if raw else {}
    entry = procs.get(container)
    if entry is None:
        _runtime_info(pod)
        raise CLIError(
            f"container {container} of pod {pod.name} is not running "
            f"(phase {pod.status.phase}); see `corral describe pod {pod.name}`"
        )
    if start_time(int(entry["pid"])) != int(entry["started"]):
        raise CLIError(
            f"container {container} of pod {pod.name} is not running on this "
            f"machine (node {pod.spec.node_name}); it may have just restarted, "
            "try again"
        )
    spec = next(c for c in pod.spec.containers if c.name == container)
    env = {
        "PATH": DEFAULT_PATH,
        "HOSTNAME": pod.spec.hostname or pod.name,
        **{e.name: e.value for e in spec.env},
    }
    try:
        cmd = exec_argv(_pod_dir(pod), container, int(entry["pid"]), argv)
    except OSError as e:
        raise CLIError(
            f"cannot read the spec of container {container} of pod {pod.name} ({e}); "
            "run `corral exec` as root where its node runs"
        ) from None
    try:
        return subprocess.call(cmd, env=env)
    except FileNotFoundError:
        raise CLIError("nsenter is not installed (Debian package util-linux)") from None
    except KeyboardInterrupt:
        return 130
