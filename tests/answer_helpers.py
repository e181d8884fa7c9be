"""A test namespace whose listeners answer with their own port (which port a
connection really reached is what socket-level load balancing tests check)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterable, Iterator

from corral.node import netns


def _answer_tcp(s: socket.socket) -> None:
    port = s.getsockname()[1]
    while True:
        try:
            c, _ = s.accept()
        except OSError:
            return
        with c:
            c.sendall(str(port).encode())


def _answer_udp(s: socket.socket) -> None:
    port = s.getsockname()[1]
    while True:
        try:
            _, a = s.recvfrom(100)
            if not a:  # shut down
                return
            s.sendto(str(port).encode(), a)
        except OSError:
            return


@contextlib.contextmanager
def answering_netns(
    name: str, tcp_ports: Iterable[int], udp_ports: Iterable[int] = (), backlog: int = 256
) -> Iterator[str]:
    """A pinned namespace (its path yielded) with lo up and listeners on 127.0.0.1 that
    answer each TCP connection and UDP datagram with their port; removed on exit."""
    path = os.path.join(netns.NETNS_DIR, name)
    netns.create_pinned(path)
    socks: list[socket.socket] = []
    try:
        with netns.entered(path):
            for port in tcp_ports:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(backlog)
                socks.append(s)
                threading.Thread(target=_answer_tcp, args=(s,), daemon=True).start()
            for port in udp_ports:
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.bind(("127.0.0.1", port))
                socks.append(u)
                threading.Thread(target=_answer_udp, args=(u,), daemon=True).start()
        yield path
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        netns.remove_pinned(path)
