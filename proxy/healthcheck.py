"""healthCheckNodePort: every node's proxy answers an external load balancer's probes.

kube-proxy's service health server (pkg/proxy/healthcheck): for each
LoadBalancer Service with externalTrafficPolicy Local, an HTTP listener on its
`spec.healthCheckNodePort` on every node, answering any path with 200 when the
node has local endpoints of the service and 503 when it has none, and the count
in the body (`{"service": {"namespace", "name"}, "localEndpoints": N,
"serviceProxyHealthy": true}`) and in `X-Load-Balancing-Endpoint-Weight`. A load
balancer that steers by it sends traffic only to nodes that will not drop it.
Mode-independent: fed from the same views every mode programs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping

from corral.proxy.core import ServiceView, usable

log = logging.getLogger(__name__)


def wanted(views: Mapping[str, ServiceView]) -> dict[int, tuple[str, int]]:
    """healthCheckNodePort -> (ns/name, local endpoints: distinct usable local IPs)."""
    out: dict[int, tuple[str, int]] = {}
    for key, v in views.items():
        port = next((sp.health_check_node_port for sp in v.ports if sp.health_check_node_port), 0)
        if not port:
            continue
        ips = {
            e.ip for sp in v.ports for e in usable(tuple(e for e in v.endpoints_of(sp) if e.local))
        }
        out[port] = (key, len(ips))
    return out


def answer(service: str, count: int) -> bytes:
    ns, _, name = service.partition("/")
    body = json.dumps(
        {
            "service": {"namespace": ns, "name": name},
            "localEndpoints": count,
            "serviceProxyHealthy": True,
        }
    ).encode()
    status = "200 OK" if count > 0 else "503 Service Unavailable"
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"X-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {count}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class HealthServers:
    """One listener per healthCheckNodePort wanted; `sync` opens and closes them."""

    def __init__(self, host: str = "0.0.0.0") -> None:
        self.host = host
        self.state: dict[int, tuple[str, int]] = {}
        self.servers: dict[int, asyncio.Server] = {}
        self._failed: dict[int, str] = {}

    async def sync(self, views: Mapping[str, ServiceView]) -> None:
        self.state = wanted(views)
        for port in [p for p in self.servers if p not in self.state]:
            self.servers.pop(port).close()
        for port in self.state:
            if port in self.servers:
                continue
            try:
                self.servers[port] = await asyncio.start_server(
                    lambda r, w, p=port: self._serve(p, r, w), self.host, port, reuse_address=True
                )
                self._failed.pop(port, None)
            except OSError as e:
                if self._failed.get(port) != str(e):
                    log.warning("healthCheckNodePort %d of %s: %s", port, self.state[port][0], e)
                    self._failed[port] = str(e)

    async def _serve(self, port: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(10):
                while (await r.readline()).strip():  # request line and headers
                    pass
                service, count = self.state.get(port, ("", 0))
                w.write(answer(service, count))
                await w.drain()
        w.close()

    def close(self) -> None:
        for s in self.servers.values():
            s.close()
        self.servers.clear()

    def debug(self) -> dict[str, dict[str, object]]:
        return {
            str(p): {"service": s, "localEndpoints": n, "listening": p in self.servers}
            for p, (s, n) in sorted(self.state.items())
        }
