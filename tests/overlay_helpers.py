"""Helpers shared by the overlay tests on simulated nodes (corral.overlay.testbed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from corral.api.store import Store
from corral.ebpf import loader
from tests.overlay_testbed import Pod, Testbed

# For modules that load BPF programs: root (namespaces, cgroups, bpffs) and BCC.
NEEDS_ROOT_AND_BCC = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces, cgroups and bpffs"),
    pytest.mark.skipif(
        loader.unavailable() is not None, reason=f"BCC cannot compile here: {loader.unavailable()}"
    ),
]


def etcd_do(url: str, fn: Callable[[Store], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        async with Store(url) as s:
            return await fn(s)

    return asyncio.run(go())


def pod(tb: Testbed, i: int) -> Pod:
    return tb.node(i).pods[0]


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); s.settimeout(60)
c, addr = s.accept(); c.sendall(addr[0].encode()); c.close()
"""

# Connect to argv[1]:argv[2], retrying for up to 30 s while the server starts.
CONNECT = """
import os, socket, sys, time
deadline = time.time() + 30
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2); break
    except OSError:
        if time.time() > deadline: raise
        time.sleep(0.1)
"""

CLIENT = (
    CONNECT
    + """
print(c.recv(100).decode())
"""
)


def peer_seen_by_server(
    tb: Testbed, server_ns: str, server_ip: str, client_ns: str, port: int
) -> str:
    srv = tb.popen(
        server_ns,
        [sys.executable, "-c", SERVER, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out = tb.run(client_ns, [sys.executable, "-c", CLIENT, server_ip, str(port)])
        return out.stdout.strip()
    finally:
        srv.kill()
        srv.wait()
