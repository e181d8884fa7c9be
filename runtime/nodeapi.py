"""The node's API: what the API server asks of a node, as kubelet's port 10250 serves it.

`GET /containerLogs/{namespace}/{pod}/{container}` (follow, tailLines, limitBytes,
previous) streams a container's log; `GET /exec/{namespace}/{pod}/{container}` with
`command=...` (one per argument), `input`, `output`, `error` and `tty` runs a command
in the container over a WebSocket speaking Kubernetes' channel protocol
(`v5.channel.k8s.io`, `v4.channel.k8s.io`): each binary message starts with its
channel (0 stdin, 1 stdout, 2 stderr, 3 the final `metav1.Status`, 4 terminal
resize; v5's 255 half-closes the channel named next). The API server relays
`kubectl logs` and `kubectl exec` here (apiserver/nodeproxy.py).

HTTPS only, and only for clients whose certificate the cluster CA signed with the
group `system:masters` (the API server's kubelet client certificate): a pod cannot
use it to run commands in another pod. Off when the node has no serving certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import struct
import termios
from typing import Any

from aiohttp import WSMsgType, web

from corral.api.objects import Pod
from corral.api.podcontainers import (
    PodAccessError,
    container_name,
    container_status,
    instance_changed,
)
from corral.common import tls
from corral.daemon.nodecontext import NodeContext
from corral.runtime import podaccess

log = logging.getLogger(__name__)

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
ADMIN_GROUP = "system:masters"
FOLLOW_POLL = 0.2  # seconds between looks at a followed log file
CHUNK = 64 * 1024


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true")


def _status(code: int, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "code": code,
    }


def _exit_status(rc: int) -> dict[str, Any]:
    """The error channel's last word: Success, or kubelet's NonZeroExitCode Status
    (kubectl exits with the code in its cause)."""
    if rc == 0:
        return {"metadata": {}, "status": "Success"}
    code = rc if rc > 0 else 128 - rc  # killed by a signal: the shell's convention
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


class NodeAPI:
    """Node component: serves the node's API on its underlay address."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.pods = ctx.informers.informer(Pod)
        self._runner: web.AppRunner | None = None

    @property
    def enabled(self) -> bool:
        o = self.ctx.options
        return bool(o.tls_cert_file and o.tls_private_key_file and o.client_ca_file)

    async def start(self) -> None:
        o = self.ctx.options
        if not self.enabled:
            log.info("node API off: no --tls-cert-file/--tls-private-key-file/--client-ca-file")
            return
        assert o.tls_cert_file and o.tls_private_key_file and o.client_ca_file
        ssl_ctx = tls.server_context(
            o.tls_cert_file, o.tls_private_key_file, o.client_ca_file, require_client=True
        )
        self.ctx.informers.start()
        app = web.Application(middlewares=[self._authorize])
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        app.router.add_route("*", "/exec/{namespace}/{pod}/{container}", self._exec)
        app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        host = self.ctx.underlay_ip or "0.0.0.0"
        await web.TCPSite(self._runner, host, o.node_api_port, ssl_context=ssl_ctx).start()
        log.info("node API on https://%s:%d", host, o.node_api_port)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ requests

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Any) -> web.StreamResponse:
        who = tls.peer_identity(request.transport)
        if who is None or ADMIN_GROUP not in who[1]:
            return web.json_response(
                _status(403, "forbidden: the node API is the API server's"), status=403
            )
        try:
            return await handler(request)
        except PodAccessError as e:
            return web.json_response(_status(e.code, str(e)), status=e.code)

    async def _pod(self, request: web.Request) -> tuple[Pod, str]:
        ns, name = request.match_info["namespace"], request.match_info["pod"]
        await self.pods.wait_synced()
        pod = self.pods.get(name, ns)
        if pod is None:
            pod = await self.ctx.store.get(Pod, name, ns)  # newer than the informer's copy
        if pod is None or pod.spec.node_name != self.ctx.node_name:
            raise PodAccessError(f'pods "{name}" not found on node {self.ctx.node_name}', 404)
        return pod, container_name(pod, request.match_info["container"])

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        pod, container = await self._pod(request)
        path = podaccess.log_path(pod, container, _flag(request, "previous"))
        try:
            f = open(path, "rb")  # noqa: SIM115 (held open while following)
        except FileNotFoundError:
            st = container_status(pod, container)
            waiting = st.state.get("waiting") if st is not None else {}
            if st is None or waiting is not None:
                reason = (waiting or {}).get("reason", "ContainerCreating")
                raise PodAccessError(
                    f'container "{container}" in pod "{pod.name}" is waiting to start: {reason}'
                ) from None
            return web.Response(text="")  # it ran and wrote nothing: kubelet's empty log
        with f:
            data = f.read()
            tail = request.query.get("tailLines")
            if tail is not None and tail.isdigit():
                data = podaccess.tail_lines(data, int(tail))
            limit = request.query.get("limitBytes")
            budget = int(limit) if limit and limit.isdigit() else None
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)

            async def send(chunk: bytes) -> bool:
                nonlocal budget
                if budget is not None:
                    chunk, budget = chunk[:budget], budget - len(chunk[:budget])
                if chunk:
                    await resp.write(chunk)
                return budget is None or budget > 0

            more = await send(data)
            if more and _flag(request, "follow") and not _flag(request, "previous"):
                await self._follow(f, pod, container, send)
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp

    async def _follow(self, f: Any, pod: Pod, container: str, send: Any) -> None:
        """New output as it comes, until the container stops or restarts (then the rest)."""
        while True:
            chunk = f.read(CHUNK)
            if chunk:
                if not await send(chunk):
                    return
                continue
            cur = self.pods.get(pod.name, pod.namespace)
            if instance_changed(pod, cur, container):
                await send(f.read())
                return
            await asyncio.sleep(FOLLOW_POLL)

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        pod, container = await self._pod(request)
        command = request.query.getall("command", [])
        loop = asyncio.get_running_loop()
        cmd = await loop.run_in_executor(None, podaccess.exec_command, pod, container, command)
        ws = web.WebSocketResponse(protocols=PROTOCOLS, heartbeat=None, max_msg_size=0)
        if not ws.can_prepare(request).ok:
            raise PodAccessError("exec needs a WebSocket upgrade (channel protocol v4 or v5)")
        await ws.prepare(request)
        try:
            await _Session(ws, cmd, request).run()
        finally:
            await ws.close()
        return ws


class _Session:
    """One exec: the process, its pipes (or terminal) and the WebSocket's channels."""

    def __init__(self, ws: web.WebSocketResponse, cmd: podaccess.ExecCommand, request: web.Request):
        self.ws = ws
        self.cmd = cmd
        self.stdin = _flag(request, "input") or _flag(request, "stdin")
        self.stdout = _flag(request, "output") or _flag(request, "stdout")
        self.stderr = _flag(request, "error") or _flag(request, "stderr")
        self.tty = _flag(request, "tty")
        self._send_lock = asyncio.Lock()

    async def _send(self, channel: int, data: bytes) -> None:
        async with self._send_lock:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_bytes(bytes([channel]) + data)

    async def run(self) -> None:
        if self.tty:
            rc = await self._run_tty()
        else:
            rc = await self._run_pipes()
        await self._send(ERROR, json.dumps(_exit_status(rc)).encode())

    async def _run_pipes(self) -> int:
        pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *self.cmd.argv,
            env=self.cmd.env,
            stdin=pipe if self.stdin else devnull,
            stdout=pipe if self.stdout else devnull,
            stderr=pipe if self.stderr else devnull,
        )
        pumps = [
            asyncio.create_task(self._pump_out(s, ch))
            for s, ch in ((proc.stdout, STDOUT), (proc.stderr, STDERR))
            if s is not None
        ]
        reader = asyncio.create_task(self._read_input(proc.stdin, None))
        try:
            rc = await proc.wait()
            await asyncio.gather(*pumps)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return rc

    async def _pump_out(self, stream: asyncio.StreamReader, channel: int) -> None:
        while chunk := await stream.read(CHUNK):
            await self._send(channel, chunk)

    async def _read_input(self, stdin: asyncio.StreamWriter | None, pty_fd: int | None) -> None:
        """Client messages: stdin data, its half-close (v5), terminal resizes. A client
        that goes away ends stdin; the process goes on to its end as kubelet's does."""
        async for msg in self.ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            channel, data = msg.data[0], msg.data[1:]
            if channel == STDIN and data:
                if stdin is not None:
                    stdin.write(data)
                    with contextlib.suppress(ConnectionError):
                        await stdin.drain()
                elif pty_fd is not None:
                    await asyncio.get_running_loop().run_in_executor(None, os.write, pty_fd, data)
            elif channel == CLOSE and data and data[-1] == STDIN:
                if stdin is not None:
                    stdin.close()
                elif pty_fd is not None:
                    os.write(pty_fd, b"\x04")  # end of input at the terminal
            elif channel == RESIZE and pty_fd is not None:
                _resize(pty_fd, data)
        if stdin is not None:
            stdin.close()

    async def _run_tty(self) -> int:
        master, slave = os.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cmd.argv,
                env={**self.cmd.env, "TERM": "xterm"},
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
        finally:
            os.close(slave)
        loop = asyncio.get_running_loop()
        out = asyncio.create_task(self._pump_pty(master))
        reader = asyncio.create_task(self._read_input(None, master))
        try:
            rc = await proc.wait()
            await out
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await loop.run_in_executor(None, os.close, master)
        return rc

    async def _pump_pty(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await loop.run_in_executor(None, os.read, fd, CHUNK)
            except OSError:  # EIO: the terminal's last process is gone
                return
            if not chunk:
                return
            await self._send(STDOUT, chunk)


def _resize(fd: int, data: bytes) -> None:
    with contextlib.suppress(ValueError, OSError, TypeError, KeyError):
        size = json.loads(data)
        fcntl.ioctl(
            fd, termios.TIOCSWINSZ, struct.pack("HHHH", size["Height"], size["Width"], 0, 0)
        )
