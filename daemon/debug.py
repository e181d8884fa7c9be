"""The root-only debug socket: connect, (optionally send a line), read one JSON document.

The document is the daemon's state: identity, health checks, every component's
supervision state and whatever the component's `debug_state()` returns. The
`corral net` verbs read each node's view through it. The socket is created
0600 (owner root) in the node's run dir; a stale one from a dead daemon is
replaced, a live one is left alone.

Requests (one line; none, or `state`, means the state): `resync` asks every
component that has a `resync()` for a full repair pass now (what `corral net
check --fix` uses for drift only the daemon can repair, e.g. a detached fast-path
program or a flushed proxy chain) and answers `{"resync": [component, ...]}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class DebugServer:
    def __init__(
        self,
        path: str,
        state: Callable[[], dict[str, Any]],
        actions: dict[str, Callable[[], dict[str, Any]]] | None = None,
    ) -> None:
        self.path = path
        self.state = state
        self.actions = actions or {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # stale: its daemon is gone
            else:
                raise RuntimeError(f"another daemon is serving {self.path}")
            finally:
                probe.close()
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # A client may send a request line ("state\n"); none is needed.
            line = b""
            with contextlib.suppress(TimeoutError, ValueError, asyncio.LimitOverrunError):
                line = await asyncio.wait_for(reader.readline(), 0.2)
            request = line.decode(errors="replace").strip() or "state"
            try:
                action = self.actions.get(request)
                if action is not None:
                    doc = action()
                elif request != "state":
                    known = ", ".join(["state", *sorted(self.actions)])
                    doc = {"error": f"unknown request {request!r}; known: {known}"}
                else:
                    doc = self.state()
            except Exception as e:
                log.exception("debug state failed")
                doc = {"error": f"{type(e).__name__}: {e}"}
            writer.write(json.dumps(doc, default=str, sort_keys=True).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def query(path: str, timeout: float = 5.0, request: str = "state") -> dict[str, Any]:
    """Read one daemon's state (or send another request) over its debug socket
    (blocking; for the CLI and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def main(argv: list[str] | None = None) -> int:
    """`python -m corral.daemon.debug [SOCKET [REQUEST]]`: print a daemon's state (the
    node's by default), or its answer to REQUEST (`resync`)."""
    import sys

    from corral.node.context import NodePaths

    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else NodePaths().debug_socket
    try:
        doc = query(path, request=args[1] if len(args) > 1 else "state")
    except OSError as e:
        print(f"error: cannot read {path}: {e.strerror or e} (is the daemon running here?)")
        return 1
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
