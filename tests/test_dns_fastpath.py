"""The UDP fast paths (compiled fastpath.c and its Python twin) answer byte for byte as
the full path does, and leave to it everything they are not sure of."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket

import dns.flags
import dns.message
import dns.rcode
import pytest

from corral.api.store import Store
from corral.clusterdns import native, wire
from tests.dns_helpers import caught_up, dns_server, endpoint_slice, malformed, service


def queries() -> list[bytes]:
    rng = random.Random(7)
    names = [
        "web.default.svc.cluster.local",
        "WEB.Default.svc.CLUSTER.local",
        "_http._tcp.web.default.svc.cluster.local",
        "db.default.svc.cluster.local",
        "db-0.db.default.svc.cluster.local",
        "nothere.default.svc.cluster.local",
        "NoThere.default.svc.cluster.local",
        "default.svc.cluster.local",
        "cluster.local",
        "10-244-1-5.default.pod.cluster.local",
        "x.pod.cluster.local",
        "20.0.96.10.in-addr.arpa",
        "dns-version.cluster.local",
    ]
    out = []
    for name in names:
        for t in ("A", "AAAA", "SRV", "TXT", "PTR", "SOA"):
            for edns in (False, 0):
                m = dns.message.make_query(name, t, use_edns=edns)
                m.id = rng.randrange(65536)
                if rng.random() < 0.3:
                    m.flags &= ~dns.flags.RD
                out.append(m.to_wire())
    cookie = dns.message.make_query(names[0], "A", use_edns=0, options=[])
    out.append(cookie.to_wire())
    return out


def exchange(port: int, packets: list[bytes]) -> list[bytes]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    out = []
    try:
        for p in packets:
            s.sendto(p, ("127.0.0.1", port))
            out.append(s.recv(65535))
    finally:
        s.close()
    return out


@pytest.mark.skipif(native.load() is None, reason="fastpath.c cannot be built here")
async def test_native_python_and_full_paths_agree(store: Store) -> None:
    await store.create(service("web", ip="10.96.0.20", ports=[{"name": "http", "port": 80}]))
    await store.create(service("db", headless=True))
    await store.create(endpoint_slice("db", [("10.244.1.5", True, "db-0")]))
    packets = queries()
    loop = asyncio.get_running_loop()
    async with (
        dns_server(store, fastpath="native") as fast,
        dns_server(store, fastpath="python") as slow,
    ):
        assert fast.native is not None and slow.native is None
        got_native = await loop.run_in_executor(None, exchange, fast.addresses[0][1], packets)
        got_python = await loop.run_in_executor(None, exchange, slow.addresses[0][1], packets)
        assert fast.resolver is not None
        full = []
        for p in packets:
            a = fast.resolver.answer(wire.parse_query(p), p, tcp=False)
            full.append(a if isinstance(a, bytes) else await a)  # forwarded: SERVFAIL
        for p, n, py, f in zip(packets, got_native, got_python, full, strict=True):
            assert n == py == f, dns.message.from_wire(p).question
        # both took the fast way for the same queries (the positive and NXDOMAIN ones)
        assert fast.stats.fast_ok == slow.stats.fast_ok
        assert fast.stats.fast_nx == slow.stats.fast_nx
        hits = sum(fast.stats.fast_ok.values()) + sum(fast.stats.fast_nx.values())
        assert hits >= 30, (fast.stats.fast_ok, fast.stats.fast_nx)


@pytest.mark.parametrize("fastpath", ["native", "python"])
async def test_fast_path_waits_for_the_sync(store: Store, fastpath: str) -> None:
    await store.create(service("web", ip="10.96.0.20"))
    async with dns_server(store, sync=False, fastpath=fastpath) as server:
        await caught_up(server, store)  # indexed, but the first full sync is not declared
        packets = [
            dns.message.make_query(name, "A", use_edns=edns).to_wire()
            for name in ("web.default.svc.cluster.local", "nothere.default.svc.cluster.local")
            for edns in (False, 0)
        ]
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, exchange, server.addresses[0][1], packets)
        assert [dns.message.from_wire(a).rcode() for a in got] == [dns.rcode.SERVFAIL] * 4


@pytest.mark.parametrize("fastpath", ["native", "python"])
async def test_malformed_packets_on_each_fast_path(store: Store, fastpath: str) -> None:
    await store.create(service("web", ip="10.96.0.20"))
    rng = random.Random(fastpath)
    async with dns_server(store, fastpath=fastpath) as server:
        port = server.addresses[0][1]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        try:
            for i in range(2000):
                with contextlib.suppress(BlockingIOError):
                    s.sendto(malformed(rng), ("127.0.0.1", port))
                if i % 100 == 0:
                    await asyncio.sleep(0.01)  # let the server read
        finally:
            s.close()
        await asyncio.sleep(0.2)
        q = dns.message.make_query("web.default.svc.cluster.local", "A").to_wire()
        loop = asyncio.get_running_loop()
        [a] = await loop.run_in_executor(None, exchange, port, [q])
        assert [r.to_text() for rr in dns.message.from_wire(a).answer for r in rr] == ["10.96.0.20"]
        assert server.stats.dropped + server.stats.formerr > 0
