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
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp

from corral.api.kubeclient import (
    APIStatusError,
    KubeClient,
    KubeConfig,
    KubeConfigError,
    default_path,
)
from corral.api.objects import Pod
from corral.api.podcontainers import PodAccessError, container_name, instance_changed
from corral.cli.common import (
    CLIError,
    add_command_argument,
    local_kubeconfig,
    run,
    store_from_args,
)
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
    _kubeconfig_flag(p)
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
    _kubeconfig_flag(p)
    add_command_argument(p, "CMD ARGS")
    p.set_defaults(func=cmd_exec)


def _kubeconfig_flag(p: Any) -> None:
    p.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="for a pod whose node is not on this machine: reach it through the API server "
        "this kubeconfig names (default: the local cluster's, else $KUBECONFIG or "
        "~/.kube/config)",
    )


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


def _log_file(pod: Pod, container: str, previous: bool) -> str | None:
    """The log file, through the runtime's root when it runs (its mount namespace); None
    when the pod's node is not on this machine."""
    try:
        path = podaccess.log_path(pod, container, previous)
        via = podaccess.log_path(pod, container, previous, _pod_dir(pod))
    except PodAccessError as e:
        raise CLIError(str(e)) from None
    return next((p for p in (via, path) if os.path.exists(p)), None)


def _api(args: argparse.Namespace, pod: Pod, what: str) -> KubeConfig:
    """The cluster's API, for a pod whose node is elsewhere: --kubeconfig, else the local
    cluster's kubeconfig (when its etcd is the one in use), else $KUBECONFIG or
    ~/.kube/config."""
    path = getattr(args, "kubeconfig", None)
    if not path and not (getattr(args, "etcd", None) or os.environ.get("CORRAL_ETCD")):
        path = local_kubeconfig(getattr(args, "cluster", None))
    path = path or default_path()
    if not os.path.exists(path):
        raise CLIError(
            f"the {what} of pod {pod.name} are on node {pod.spec.node_name}, not on this "
            "machine, and there is no kubeconfig to reach the cluster's API "
            f"({path}): give one with --kubeconfig, or run `corral {what}` on that node"
        )
    try:
        return KubeConfig.load(path)
    except KubeConfigError as e:
        raise CLIError(str(e)) from None


async def _logs_via_api(cfg: KubeConfig, args: argparse.Namespace, container: str) -> int:
    params = {"container": container}
    if args.follow and not args.previous:
        params["follow"] = "true"
    if args.previous:
        params["previous"] = "true"
    if args.tail >= 0:
        params["tailLines"] = str(args.tail)
    path = f"/api/v1/namespaces/{args.namespace}/pods/{args.pod}/log"
    out = sys.stdout.buffer
    async with KubeClient(cfg, "corral-logs") as c, c.get(path, **params) as r:
        await c.check(r)
        async for chunk in r.content.iter_any():
            out.write(chunk)
            out.flush()
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    pod = run(lambda: _get_pod(args))
    container = _container(pod, args.container)
    path = _log_file(pod, container, args.previous)
    if path is None:  # its node is elsewhere: through the API server
        cfg = _api(args, pod, "logs")
        try:
            return int(run(lambda: _logs_via_api(cfg, args, container)))
        except KeyboardInterrupt:
            return 0
        except (APIStatusError, aiohttp.ClientError) as e:
            raise CLIError(f"corral logs via {cfg.server}: {e}") from None
    out = sys.stdout.buffer
    with open(path, "rb") as f:
        data = f.read()
        if args.tail >= 0:
            data = podaccess.tail_lines(data, args.tail)
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
    if not podaccess.runs_here(pod, container):  # its node is elsewhere: the API server's
        cfg = _api(args, pod, "exec")
        try:
            return int(run(lambda: _exec_via_api(cfg, args, container, argv)))
        except KeyboardInterrupt:
            return 130
        except (APIStatusError, aiohttp.ClientError) as e:
            raise CLIError(f"corral exec via {cfg.server}: {e}") from None
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


async def _exec_via_api(
    cfg: KubeConfig, args: argparse.Namespace, container: str, argv: list[str]
) -> int:
    """The exec subresource over a WebSocket (v5 channel protocol): stdin passed through
    (unless it is a terminal and -i was not given), stdout/stderr written as they come,
    the exit code from the final Status."""
    send_stdin = args.stdin or not sys.stdin.isatty()
    params = [("command", a) for a in argv] + [
        ("container", container),
        ("stdin", "true" if send_stdin else "false"),
        ("stdout", "true"),
        ("stderr", "true"),
    ]
    path = f"/api/v1/namespaces/{args.namespace}/pods/{args.pod}/exec"
    async with KubeClient(cfg, "corral-exec") as c:
        ws = await c.websocket(path, params, ("v5.channel.k8s.io", "v4.channel.k8s.io"))
        loop = asyncio.get_running_loop()

        async def pump_stdin() -> None:
            while chunk := await loop.run_in_executor(None, sys.stdin.buffer.read1, 65536):
                await ws.send_bytes(b"\x00" + chunk)
            if ws.protocol == "v5.channel.k8s.io":
                await ws.send_bytes(b"\xff\x00")  # stdin is done

        feeder = asyncio.create_task(pump_stdin()) if send_stdin else None
        rc = 0
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                    continue
                channel, data = msg.data[0], msg.data[1:]
                if channel in (1, 2):
                    stream = sys.stdout.buffer if channel == 1 else sys.stderr.buffer
                    stream.write(data)
                    stream.flush()
                elif channel == 3:
                    rc = _exit_code(data)
        finally:
            if feeder is not None:
                feeder.cancel()
            await ws.close()
    return rc


def _exit_code(status: bytes) -> int:
    try:
        st = json.loads(status)
    except ValueError:
        return 1
    if st.get("status") == "Success":
        return 0
    for cause in (st.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode" and str(cause.get("message", "")).isdigit():
            return int(cause["message"])
    print(st.get("message", "exec failed"), file=sys.stderr)
    return 1
