"""A TCP relay that makes the host's loopback etcd reachable from inside node namespaces.

A node's 127.0.0.1 is its own loopback, so an external etcd given as
http://127.0.0.1:2379 is out of reach for node daemons. This one process opens
a listening socket on 127.0.0.1:<port> inside each node's network namespace
(a socket keeps the namespace it was created in) and forwards every connection
to the same host:port as seen from the host. Nodes therefore use the very URLs
the host uses.

    python -m corral.cluster.relay --netns NS [--netns NS ...] --target HOST:PORT [...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket

from corral.node import netns


def listen_in(ns: str, port: int) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    s.setblocking(False)
    return s


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _handler(host: str, port: int):  # type: ignore[no-untyped-def]
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))

    return handle


async def serve(namespaces: list[str], targets: list[tuple[str, int]]) -> None:
    servers = []
    for host, port in targets:
        for ns in namespaces:
            sock = listen_in(ns, port)
            servers.append(await asyncio.start_server(_handler(host, port), sock=sock))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="corral-relay")
    p.add_argument("--netns", action="append", required=True)
    p.add_argument("--target", action="append", required=True, help="HOST:PORT")
    a = p.parse_args(argv)
    targets = []
    for t in a.target:
        host, _, port = t.rpartition(":")
        targets.append((host, int(port)))
    asyncio.run(serve(a.netns, targets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
