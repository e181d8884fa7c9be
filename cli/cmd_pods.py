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
import os
import subprocess
import sys
import time
from typing import Any

from corral.api.objects import Pod
from corral.api.podcontainers import PodAccessError, container_name, instance_changed
from corral.cli.common import CLIError, add_command_argument, run, store_from_args
from corral.node.procs import start_time
from corral.runtime import podaccess


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
    try:
        return container_name(pod, name)
    except PodAccessError as e:
        raise CLIError(f"{e}; choose one with -c") from None


def _runtime_info(pod: Pod) -> dict[str, Any]:
    try:
        return podaccess.runtime_info(pod)
    except PodAccessError as e:
        raise CLIError(str(e)) from None


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
    """The log file, through the runtime's root when it runs (its mount namespace)."""
    try:
        path = podaccess.log_path(pod, container, previous)
        via = podaccess.log_path(pod, container, previous, _pod_dir(pod))
    except PodAccessError as e:
        raise CLIError(str(e)) from None
    for p in (via, path):
        if os.path.exists(p):
            return p
    raise CLIError(
        f"no logs for container {container} of pod {pod.name} on this machine "
        f"(node {pod.spec.node_name}; run `corral logs` where that node runs)"
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
                    if instance_changed(pod, cur, container):
                        out.write(f.read())
                        out.flush()
                        return 0
                time.sleep(0.2)
        except KeyboardInterrupt:
            return 0


async def _maybe_pod(args: argparse.Namespace) -> Pod | None:
    async with store_from_args(args) as store:
        return await store.get(Pod, args.pod, args.namespace)


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.cmd)
    if not argv:
        raise CLIError("no command given: corral exec POD -- CMD [ARGS...]")
    pod = run(lambda: _get_pod(args))
    container = _container(pod, args.container)
    try:
        cmd = podaccess.exec_command(pod, container, argv, _pod_dir(pod))
    except PodAccessError as e:
        raise CLIError(f"{e}; see `corral describe pod {pod.name}`") from None
    try:
        return subprocess.call(cmd.argv, env=cmd.env)
    except FileNotFoundError:
        raise CLIError("nsenter is not installed (Debian package util-linux)") from None
    except KeyboardInterrupt:
        return 130
