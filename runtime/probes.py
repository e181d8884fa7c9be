"""Exec, TCP and HTTP probes and the loop that turns results into a state.

A probe handler returns (ok, message). `ProbeLoop` runs one handler every
periodSeconds after initialDelaySeconds and flips its state after
successThreshold successes or failureThreshold failures, as the kubelet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from corral.api.objects import Container, Probe

log = logging.getLogger(__name__)

Handler = Callable[[], Awaitable[tuple[bool, str]]]


def resolve_port(port: int | str, container: Container) -> int:
    if isinstance(port, int):
        return port
    for p in container.ports:
        if p.name == port:
            return p.container_port
    if port.isdigit():
        return int(port)
    raise ValueError(f"container {container.name} has no port named {port!r}")


async def tcp_check(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as e:
        return False, f"dial tcp {host}:{port}: {e or 'timeout'}"
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return True, ""


async def http_check(
    host: str,
    port: int,
    path: str,
    timeout: float,
    scheme: str = "HTTP",
    headers: list[tuple[str, str]] | None = None,
) -> tuple[bool, str]:
    """GET; any status from 200 to 399 is a success (redirects are not followed)."""
    ctx = None
    if scheme == "HTTPS":
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    hdrs = {
        "Host": f"{host}:{port}",
        "User-Agent": "corral-probe/1.0",
        "Accept": "*/*",
        "Connection": "close",
    }
    hdrs.update(dict(headers or []))

    async def go() -> tuple[bool, str]:
        r, w = await asyncio.open_connection(host, port, ssl=ctx)
        try:
            req = (
                f"GET {path or '/'} HTTP/1.1\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
                + "\r\n"
            )
            w.write(req.encode())
            await w.drain()
            line = await r.readline()
        finally:
            w.close()
        parts = line.decode(errors="replace").split()
        if len(parts) < 2 or not parts[1].isdigit():
            return False, f"bad HTTP response {line[:80]!r}"
        code = int(parts[1])
        return 200 <= code < 400, f"HTTP probe failed with statuscode: {code}"

    try:
        return await asyncio.wait_for(go(), timeout)
    except (OSError, TimeoutError, ssl.SSLError) as e:
        return False, f"Get {scheme.lower()}://{host}:{port}{path}: {e or 'timeout'}"


async def exec_check(argv: list[str], env: dict[str, str], timeout: float) -> tuple[bool, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"command timed out after {timeout:.0f}s"
    return proc.returncode == 0, out.decode(errors="replace")[-200:]


def handler_for(
    probe: Probe,
    container: Container,
    pod_ip: str,
    exec_argv: Callable[[list[str]], list[str]],
    env: dict[str, str],
) -> Handler:
    timeout = float(probe.timeout_seconds)
    if probe.exec is not None:
        cmd = list(probe.exec.command)
        return lambda: exec_check(exec_argv(cmd), env, timeout)
    if probe.tcp_socket is not None:
        port = resolve_port(probe.tcp_socket.port, container)
        host = probe.tcp_socket.host or pod_ip
        return lambda: tcp_check(host, port, timeout)
    hg = probe.http_get
    assert hg is not None
    port = resolve_port(hg.port, container)
    host = hg.host or pod_ip
    headers = [(h.name, h.value) for h in hg.http_headers]
    return lambda: http_check(host, port, hg.path, timeout, hg.scheme, headers)


class ProbeLoop:
    """Runs a probe; calls `on_change(ok, message)` whenever its state flips."""

    def __init__(
        self,
        probe: Probe,
        handler: Handler,
        on_change: Callable[[bool, str], None],
        initial: bool = False,
        resume: bool = False,
    ) -> None:
        self.probe, self.handler, self.on_change = probe, handler, on_change
        self.state = initial
        self.resume = resume  # a container that was already running: no initial delay

    async def run(self) -> None:
        p = self.probe
        if not self.resume:
            await asyncio.sleep(p.initial_delay_seconds)
        ok_run = fail_run = 0
        while True:
            try:
                ok, msg = await self.handler()
            except Exception as e:  # a probe must never kill its container's loop
                ok, msg = False, f"probe error: {e}"
            if ok:
                ok_run, fail_run = ok_run + 1, 0
            else:
                ok_run, fail_run = 0, fail_run + 1
            if not self.state and ok and ok_run >= p.success_threshold:
                self.state = True
                self.on_change(True, "")
            elif self.state and not ok and fail_run >= p.failure_threshold:
                self.state = False
                self.on_change(False, msg)
            elif not self.state and not ok and fail_run == p.failure_threshold:
                self.on_change(False, msg)  # report the failure once, while still down
            await asyncio.sleep(p.period_seconds)
