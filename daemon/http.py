"""The per-daemon HTTP server: `/metrics`, `/healthz`, `/readyz` (asyncio, no threads).

A deliberately small HTTP/1.1 responder: GET only, one request per connection.
`/healthz?verbose` and `/readyz?verbose` list every check, as Kubernetes does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from corral.common.metrics import REGISTRY
from corral.daemon.health import Report

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HTTPServer:
    def __init__(
        self,
        host: str,
        port: int,
        health: Callable[[], Report],
        ready: Callable[[], Report],
    ) -> None:
        self.host, self.port = host, port
        self.health, self.ready = health, ready
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        if self.port == 0:  # tests: the kernel picked one
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        path, _, query = target.partition("?")
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/metrics":
            self.health()  # brings the health gauges up to date
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path in ("/healthz", "/readyz", "/livez"):
            what = path.lstrip("/")
            report = self.ready() if path == "/readyz" else self.health()
            verbose = "verbose" in query.split("&")
            body = report.text(verbose, what).encode()
            return (200 if report.ok else 503), "text/plain; charset=utf-8", body
        return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) < 2:
                return
            method, target = parts[0], parts[1]
            try:
                code, ctype, body = self.respond(method, target)
            except Exception as e:  # never let a scrape take the server down
                log.exception("HTTP %s %s failed", method, target)
                code, ctype, body = 503, "text/plain", f"internal error: {e}\n".encode()
            writer.write(
                (
                    f"HTTP/1.1 {code} {_REASONS.get(code, '')}\r\n"
                    f"Content-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
