"""Cluster DNS tests: objects, a server on loopback, dnspython queries, a stub upstream."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.api.informer import InformerFactory
from corral.api.objects import EndpointSlice, Pod, Service
from corral.api.store import Store
from corral.clusterdns.server import Config, DNSServer
from tests import kit

ZONE = "cluster.local"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()


# ------------------------------------------------------------ objects


def service(
    name: str,
    ns: str = "default",
    *,
    ip: str | None = None,
    ports: list[dict[str, Any]] | None = None,
    headless: bool = False,
    external: str | None = None,
    publish: bool = False,
) -> Service:
    spec: dict[str, Any] = {}
    if external:
        spec = {"type": "ExternalName", "externalName": external}
    else:
        spec = {
            "clusterIP": "None" if headless else ip,
            "ports": ports if ports is not None else [{"port": 80}],
            "publishNotReadyAddresses": publish,
        }
        if not headless:
            spec["clusterIPs"] = [ip]
    return Service.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def endpoint_slice(
    svc: str,
    endpoints: list[tuple[str, bool, str | None]],
    ns: str = "default",
    *,
    ports: list[tuple[str | None, int, str]] | None = None,
    name: str | None = None,
) -> EndpointSlice:
    """`endpoints`: (ip, ready, hostname); `ports`: (name, port, protocol)."""
    return EndpointSlice.model_validate(
        {
            "metadata": {
                "name": name or svc,
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": svc},
            },
            "endpoints": [
                {"addresses": [ip], "conditions": {"ready": ready}, "hostname": host}
                if host
                else {"addresses": [ip], "conditions": {"ready": ready}}
                for ip, ready, host in endpoints
            ],
            "ports": [
                {"port": p, "protocol": proto, **({"name": n} if n else {})}
                for n, p, proto in (ports or [])
            ],
        }
    )


def pod(name: str, ip: str, ns: str = "default") -> Pod:
    return Pod.model_validate(
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}]},
            "status": {"phase": "Running", "podIP": ip},
        }
    )


# ------------------------------------------------------------ the server


@contextlib.asynccontextmanager
async def dns_server(store: Store, *, sync: bool = True, **config: Any) -> AsyncIterator[DNSServer]:
    """A DNSServer on a free loopback port, running in this loop (synced unless told)."""
    port = free_port()
    config.setdefault("upstreams", [])
    config.setdefault("forward_timeout", 0.5)
    informers = InformerFactory(store)
    server = DNSServer(store, informers, Config(listen=[("127.0.0.1", port)], **config))
    await server.start()
    task = None
    try:
        if sync:
            task = asyncio.create_task(server.run())
            await wait_for(lambda: server.synced)
        yield server
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.stop()
        await informers.stop()


async def wait_for(cond: Any, timeout: float = 20.0) -> None:
    await kit.eventually(cond, str(cond), timeout, interval=0.01)


async def settled(server: DNSServer) -> None:
    """Every watch event the informers have is in the index (handlers and flush done)."""

    def idle() -> bool:
        return (
            all(r.queue.qsize() == 0 for r in server._regs)
            and not server._flush_scheduled
            and not server._dirty
        )

    await asyncio.sleep(0)
    await wait_for(idle)


async def caught_up(server: DNSServer, store: Store, kind: type = Service) -> None:
    """The informer of `kind` has seen everything written so far, and it is in the index."""
    rev = await store.revision()
    inf = server.slices if kind is EndpointSlice else server.services
    await wait_for(lambda: inf._rev > rev)
    await settled(server)


async def ask(
    server: DNSServer,
    name: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    edns: int | None = None,
    payload: int = 1232,
) -> dns.message.Message:
    port = server.addresses[0][1]
    q = dns.message.make_query(
        name, rdtype, use_edns=False if edns is None else edns, payload=payload
    )
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=5)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=5, ignore_trailing=False)


def values(msg: dns.message.Message, rdtype: str | None = None) -> list[str]:
    """Every rdata of the answer section as text (of one type, if given)."""
    out = []
    for rrset in msg.answer:
        if rdtype is None or rrset.rdtype == dns.rdatatype.from_text(rdtype):
            out += [r.to_text() for r in rrset]
    return sorted(out)


def rcode(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())


def soa_ttl(msg: dns.message.Message) -> int | None:
    for rrset in msg.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return rrset.ttl
    return None


# ------------------------------------------------------------ a stub upstream


class StubUpstream:
    """A resolver on loopback (UDP and TCP) answering from `records`: name -> [(type,
    rdata text)]. Answers over UDP that exceed 512 bytes come truncated (TC)."""

    def __init__(self, records: dict[str, list[tuple[str, str]]], ttl: int = 60) -> None:
        self.records = {dns.name.from_text(k): v for k, v in records.items()}
        self.ttl = ttl
        self.udp_queries = 0
        self.tcp_queries = 0
        self.port = 0
        self._transport: Any = None
        self._server: Any = None

    def respond(self, wire: bytes, limit: int | None) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        question = q.question[0]
        found = self.records.get(question.name)
        if found is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        for t, text in found or []:
            if dns.rdatatype.from_text(t) == question.rdtype:
                rr = r.find_rrset(
                    r.answer, question.name, dns.rdataclass.IN, question.rdtype, create=True
                )
                rr.add(dns.rdata.from_text(dns.rdataclass.IN, question.rdtype, text), self.ttl)
        out = r.to_wire()
        if limit is not None and len(out) > limit:
            r.answer = []
            r.flags |= dns.flags.TC
            out = r.to_wire()
        return out

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        stub = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                stub.udp_queries += 1
                q = dns.message.from_wire(data)
                limit = max(512, q.payload) if q.edns >= 0 else 512
                self.transport.sendto(stub.respond(data, limit), addr)

        self.port = free_port()
        self._transport, _ = await loop.create_datagram_endpoint(
            Proto, local_addr=("127.0.0.1", self.port)
        )

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    (n,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(n)
                    self.tcp_queries += 1
                    out = self.respond(data, None)
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(client, "127.0.0.1", self.port)

    async def stop(self) -> None:
        self._transport.close()
        self._server.close()
        await self._server.wait_closed()


# ------------------------------------------------------------ bad packets


def _valid_query(rng: random.Random) -> bytes:
    name = rng.choice(
        [
            "web.default.svc.cluster.local",
            "nothere.default.svc.cluster.local",
            "x.example.org",
            "cluster.local",
        ]
    )
    q = dns.message.make_query(
        name, rng.choice(["A", "SRV", "AAAA", "PTR"]), use_edns=rng.random() < 0.5
    )
    return q.to_wire()


def malformed(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:  # noise of any length
        return rng.randbytes(rng.randrange(0, 700))
    good = bytearray(_valid_query(rng))
    if kind == 1:  # flipped bytes
        for _ in range(rng.randrange(1, 6)):
            good[rng.randrange(len(good))] = rng.randrange(256)
        return bytes(good)
    if kind == 2:  # cut short
        return bytes(good[: rng.randrange(len(good))])
    if kind == 3:  # absurd counts
        struct.pack_into("!HHHH", good, 4, *(rng.randrange(65536) for _ in range(4)))
        return bytes(good)
    if kind == 4:  # a compression loop in the question
        return bytes(good[:12]) + b"\x01a\xc0\x0c" + b"\x00\x01\x00\x01"
    if kind == 5:  # a pointer forward, labels too long
        return bytes(good[:12]) + b"\xc0\xff\x00\x01\x00\x01" + b"\x7f" + b"a" * 127
    return bytes(good) + rng.randbytes(rng.randrange(1, 40))  # trailing garbage
