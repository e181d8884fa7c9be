"""Pod subresources that live on the pod's node: `log` and `exec`, relayed to the node's
API (runtime/nodeapi.py) as kube-apiserver relays them to kubelet.

The server checks what it can answer itself (the pod, its node, the container's name)
with kube-apiserver's wording, then connects to the node's address from its Node
object (`status.addresses` InternalIP, `status.daemonEndpoints.kubeletEndpoint.Port`)
with its kubelet client certificate (`--kubelet-client-certificate`), verifying the
node against `--kubelet-certificate-authority`. A log streams back as it arrives; an
exec is a WebSocket relayed frame by frame (the channel protocol is the node's and the
client's business). kubectl 1.30 and newer exec over WebSockets; older ones ask for
SPDY, which this server does not speak: they get a Status that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import WSMsgType, web

from corral.api.objects import Node, Pod
from corral.api.podcontainers import PodAccessError, container_name
from corral.api.store import Store
from corral.apiserver import errors
from corral.common import tls

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
LOG_PARAMS = ("follow", "previous", "tailLines", "limitBytes", "timestamps", "sinceSeconds")
CONNECT_TIMEOUT = 10.0


class NodeProxy:
    """The API server's client of the nodes' API."""

    def __init__(self, store: Store, ca: str, cert: str, key: str) -> None:
        self.store = store
        self.ssl: ssl.SSLContext = tls.client_context(ca, cert, key)
        self.ssl.check_hostname = False  # nodes are dialled by address; the CA vouches

    async def _target(self, ns: str, name: str, container: str | None) -> tuple[str, Pod, str]:
        """(https://node:port, pod, container) or the Status kube-apiserver answers."""
        pod = await self.store.get(Pod, name, ns)
        if pod is None:
            raise errors.not_found("pods", "", name)
        try:
            c = container_name(pod, container)
        except PodAccessError as e:
            raise errors.bad_request(str(e)) from None
        if not pod.spec.node_name:
            raise errors.bad_request(f"pod {name} does not have a host assigned")
        node = await self.store.get(Node, pod.spec.node_name)
        ip = node.status.address("InternalIP") if node is not None else None
        ep = (node.status.daemon_endpoints or {}) if node is not None else {}
        port = (ep.get("kubeletEndpoint") or {}).get("Port") if isinstance(ep, dict) else None
        if not ip or not port:
            raise errors.APIError(
                503,
                "ServiceUnavailable",
                f"node {pod.spec.node_name} serves no node API (its agent runs without "
                "--tls-cert-file): logs and exec of its pods cannot be reached",
            )
        return f"https://{ip}:{port}", pod, c

    async def logs(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        base, pod, c = await self._target(ns, name, request.query.get("container"))
        query = {k: request.query[k] for k in LOG_PARAMS if k in request.query}
        url = f"{base}/containerLogs/{ns}/{name}/{c}?{urlencode(query)}"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url, ssl=self.ssl) as r:
                if r.status != 200:
                    raise _node_error(r.status, await r.read())
                resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                with contextlib.suppress(ConnectionError):
                    await resp.write_eof()
                return resp
        except aiohttp.ClientError as e:
            raise _unreachable(pod, e) from None

    async def exec(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        base, pod, c = await self._target(ns, name, request.query.get("container"))
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise errors.bad_request(
                "exec needs a WebSocket upgrade (v5.channel.k8s.io, kubectl 1.30 or newer); "
                "this server does not speak SPDY"
            )
        query: list[tuple[str, str]] = [("command", a) for a in request.query.getall("command", [])]
        for k in ("stdin", "stdout", "stderr", "tty"):
            if k in request.query:
                query.append((k, request.query[k]))
        url = f"{base}/exec/{ns}/{name}/{c}?{urlencode(query)}"
        client = web.WebSocketResponse(protocols=PROTOCOLS, max_msg_size=0)
        ready = client.can_prepare(request)
        if not ready.ok or not ready.protocol:
            raise errors.bad_request(f"exec speaks {' or '.join(PROTOCOLS)} over WebSockets")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        session = aiohttp.ClientSession(timeout=timeout)
        try:
            try:
                node = await session.ws_connect(
                    url, protocols=(ready.protocol,), ssl=self.ssl, max_msg_size=0
                )
            except aiohttp.WSServerHandshakeError as e:
                code = e.status if e.status >= 400 else 502
                raise errors.APIError(code, "BadRequest", e.message) from None
            except aiohttp.ClientError as e:
                raise _unreachable(pod, e) from None
            await client.prepare(request)
            await _relay(client, node)
            return client
        finally:
            await session.close()


async def _relay(client: web.WebSocketResponse, node: aiohttp.ClientWebSocketResponse) -> None:
    """Frames both ways until the node's side ends (the process exited)."""

    async def up() -> None:
        async for msg in client:
            if msg.type == WSMsgType.BINARY:
                await node.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await node.send_str(msg.data)

    task = asyncio.create_task(up())
    try:
        async for msg in node:
            if msg.type == WSMsgType.BINARY:
                await client.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await client.send_str(msg.data)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
        await node.close()
        await client.close()


def _node_error(code: int, body: bytes) -> errors.APIError:
    """The node's Status (or text) as this server's error."""

    message = body.decode(errors="replace")
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(body).get("message", message)
    reason = {400: "BadRequest", 403: "Forbidden", 404: "NotFound"}.get(code, "InternalError")
    return errors.APIError(code, reason, message)


def _unreachable(pod: Pod, e: Any) -> errors.APIError:
    return errors.APIError(
        502,
        "InternalError",
        f"cannot reach the node API of {pod.spec.node_name} for pod {pod.name}: {e}",
    )
