"""Forwarding out of the cluster zone to a stub upstream on loopback (UDP, TCP on
truncation, cache, failures), and ExternalName services resolved through it."""

from __future__ import annotations

import dns.flags

from corral.api.store import Store
from tests.dns_helpers import StubUpstream, ask, dns_server, free_port, rcode, service, values

BIG = [("TXT", f'"{"x" * 40} {i}"') for i in range(30)]  # ~1.4 kB: truncated over UDP


async def upstream() -> StubUpstream:
    stub = StubUpstream(
        {
            "example.org.": [("A", "198.51.100.7"), ("AAAA", "2001:db8::7")],
            "big.example.org.": BIG,
            "www.example.net.": [("A", "198.51.100.8")],
        }
    )
    await stub.start()
    return stub


async def test_forwarding_udp_tcp_and_cache(store: Store) -> None:
    stub = await upstream()
    try:
        async with dns_server(store, upstreams=[("127.0.0.1", stub.port)]) as server:
            m = await ask(server, "example.org.")
            assert rcode(m) == "NOERROR" and values(m) == ["198.51.100.7"]
            assert not m.flags & dns.flags.AA
            assert stub.udp_queries == 1
            again = await ask(server, "EXAMPLE.org.")  # from the cache, in the asker's case
            assert values(again) == ["198.51.100.7"]
            assert again.question[0].name.to_text() == "EXAMPLE.org."
            assert stub.udp_queries == 1 and server.forwarder.stats.cache_hits == 1
            assert values(await ask(server, "example.org.", tcp=True)) == ["198.51.100.7"]
            nx = await ask(server, "nothing.example.org.")
            assert rcode(nx) == "NXDOMAIN"
            # a truncated upstream answer is asked again over TCP
            big = await ask(server, "big.example.org.", "TXT", tcp=True)
            assert len(values(big)) == 30 and stub.tcp_queries == 1
            assert server.forwarder.stats.tcp_retries == 1
            udp = await ask(server, "big.example.org.", "TXT", edns=0, payload=4096)
            assert len(values(udp)) == 30 and not udp.flags & dns.flags.TC
            small = await ask(server, "big.example.org.", "TXT")  # no EDNS: 512 bytes
            assert small.flags & dns.flags.TC
    finally:
        await stub.stop()


async def test_servfail_when_every_upstream_fails(store: Store) -> None:
    dead = [("127.0.0.1", free_port()), ("127.0.0.1", free_port())]
    async with dns_server(store, upstreams=dead, forward_timeout=0.3) as server:
        m = await ask(server, "example.org.")
        assert rcode(m) == "SERVFAIL"
        assert server.forwarder.stats.failures == 1
    async with dns_server(store, upstreams=[]) as server:
        assert rcode(await ask(server, "example.org.")) == "SERVFAIL"


async def test_second_upstream_answers_when_the_first_is_down(store: Store) -> None:
    stub = await upstream()
    try:
        ups = [("127.0.0.1", free_port()), ("127.0.0.1", stub.port)]
        async with dns_server(store, upstreams=ups, forward_timeout=0.3) as server:
            assert values(await ask(server, "example.org.")) == ["198.51.100.7"]
            assert values(await ask(server, "www.example.net.")) == ["198.51.100.8"]
    finally:
        await stub.stop()


async def test_external_name(store: Store) -> None:
    stub = await upstream()
    await store.create(service("ext", external="www.example.net"))
    await store.create(service("web", ip="10.96.0.20"))
    await store.create(service("alias", external="web.default.svc.cluster.local"))
    try:
        async with dns_server(store, upstreams=[("127.0.0.1", stub.port)]) as server:
            name = "ext.default.svc.cluster.local."
            c = await ask(server, name, "CNAME")
            assert values(c) == ["www.example.net."]
            a = await ask(server, name)
            assert values(a, "CNAME") == ["www.example.net."]
            assert values(a, "A") == ["198.51.100.8"]
            assert a.answer[0].name.to_text() == name
            # a target inside the zone is answered from the index
            inner = await ask(server, "alias.default.svc.cluster.local.")
            assert values(inner, "CNAME") == ["web.default.svc.cluster.local."]
            assert values(inner, "A") == ["10.96.0.20"]
    finally:
        await stub.stop()
