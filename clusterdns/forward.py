"""Forwarding what is outside the cluster zone to the node's upstream resolvers.

Each query goes to the upstreams in turn (starting with the one that last
answered), over UDP from a fresh socket connected to it (a random source port
per query, and only that upstream's packets are read), with a timeout; a
truncated answer is asked again over TCP. SERVFAIL and REFUSED move on to the
next upstream; when every upstream fails the client gets SERVFAIL. Answers
(NOERROR and NXDOMAIN) are kept in a small LRU cache for their smallest TTL
(a negative one for the SOA's), and served with the TTLs counted down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from corral.clusterdns import wire
from corral.clusterdns.wire import Query

log = logging.getLogger(__name__)

MAX_CACHE_TTL = 300


def read_resolv_conf(path: str) -> list[tuple[str, int]]:
    """The IPv4 nameservers of a resolv.conf (its IPv6 ones are skipped: IPv4 only)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                    out.append((parts[1], 53))
    except OSError:
        return []
    return out


@dataclass
class Cached:
    msg: bytes  # the answer with ID 0
    qlen: int  # length of its question section (replaced by the client's)
    ttl_offsets: list[int]
    stored: float
    expires: float


@dataclass
class ForwardStats:
    requests: int = 0  # queries sent upstream (each try counts)
    timeouts: int = 0
    tcp_retries: int = 0
    failures: int = 0  # queries no upstream answered: SERVFAIL
    cache_hits: int = 0
    cache_misses: int = 0


class Forwarder:
    def __init__(
        self,
        upstreams: list[tuple[str, int]],
        *,
        timeout: float = 2.0,
        cache_size: int = 1000,
    ) -> None:
        self.upstreams = upstreams
        self.timeout = timeout
        self.cache_size = cache_size
        self.cache: OrderedDict[tuple[bytes, bool, bool], Cached] = OrderedDict()
        self.stats = ForwardStats()
        self._first = 0

    # ------------------------------------------------------------ the cache

    def _cache_key(self, q: Query) -> tuple[bytes, bool, bool]:
        return (q.key + q.question[len(q.qname) :], q.edns, q.do)

    def cached(self, q: Query, tcp: bool) -> bytes | None:
        if self.cache_size <= 0:
            return None
        key = self._cache_key(q)
        c = self.cache.get(key)
        now = time.monotonic()
        if c is None or c.expires <= now:
            if c is not None:
                del self.cache[key]
            self.stats.cache_misses += 1
            return None
        self.cache.move_to_end(key)
        self.stats.cache_hits += 1
        msg = bytearray(c.msg)
        struct.pack_into("!H", msg, 0, q.id)
        msg[12 : 12 + c.qlen] = q.question  # the client's case
        elapsed = int(now - c.stored)
        for off in c.ttl_offsets:
            (ttl,) = struct.unpack_from("!I", msg, off)
            struct.pack_into("!I", msg, off, max(0, ttl - elapsed))
        return self._fit(q, bytes(msg), tcp)

    def _store(self, q: Query, answer: bytes) -> None:
        if self.cache_size <= 0:
            return
        try:
            flags, rcode, sections = wire.parse_response(answer)
        except (ValueError, struct.error):
            return
        if rcode not in (wire.NOERROR, wire.NXDOMAIN) or flags & 0x0200:
            return
        recs = [r for sec in sections for r in sec]
        if not recs:
            return
        ttl = min(r.ttl for r in recs)
        for r in sections[1]:
            if r.rtype == wire.SOA and len(r.rdata) >= 4:
                ttl = min(ttl, struct.unpack("!I", r.rdata[-4:])[0])
        ttl = min(ttl, MAX_CACHE_TTL)
        if ttl <= 0:
            return
        now = time.monotonic()
        msg = bytearray(answer)
        struct.pack_into("!H", msg, 0, 0)
        key = self._cache_key(q)
        self.cache[key] = Cached(
            bytes(msg), len(q.question), [r.ttl_offset for r in recs], now, now + ttl
        )
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    @staticmethod
    def _fit(q: Query, msg: bytes, tcp: bool) -> bytes:
        if len(msg) <= q.limit(tcp):
            return msg
        flags = struct.unpack_from("!H", msg, 2)[0] | 0x0200
        return (
            wire.header(q.id, flags, 1, 0, 0, 1 if q.edns else 0)
            + q.question
            + (wire.opt_rr() if q.edns else b"")
        )

    # ------------------------------------------------------------ asking

    async def forward(self, q: Query, raw: bytes, tcp: bool) -> bytes:
        """The upstreams' answer to the client's query `raw`, with the client's ID."""
        hit = self.cached(q, tcp)
        if hit is not None:
            return hit
        answer = await self.ask(raw, q)
        if answer is None:
            self.stats.failures += 1
            return wire.error(q.id, q.flags, wire.SERVFAIL, q.question, q.edns)
        self._store(q, answer)
        msg = bytearray(answer)
        struct.pack_into("!H", msg, 0, q.id)
        return self._fit(q, bytes(msg), tcp)

    async def ask(self, raw: bytes, q: Query) -> bytes | None:
        """Ask each upstream in turn; the first good answer (or None)."""
        n = len(self.upstreams)
        for i in range(n):
            idx = (self._first + i) % n
            host, port = self.upstreams[idx]
            qid = random.getrandbits(16)
            out = struct.pack("!H", qid) + raw[2:]
            try:
                ans = await self._udp(host, port, out, qid, q)
                if ans is not None and ans[2] & 0x02:  # TC: ask again over TCP
                    self.stats.tcp_retries += 1
                    ans = await self._tcp(host, port, out, qid)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                log.debug("upstream %s:%d: %s", host, port, e)
                ans = None
            if ans is None:
                continue
            rcode = ans[3] & 0xF
            if rcode in (wire.SERVFAIL, wire.REFUSED, wire.NOTIMP):
                continue
            self._first = idx
            return ans
        return None

    async def _udp(self, host: str, port: int, out: bytes, qid: int, q: Query) -> bytes | None:
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
            self.stats.requests += 1
            await loop.sock_sendall(s, out)
            deadline = loop.time() + self.timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    self.stats.timeouts += 1
                    return None
                try:
                    data = await asyncio.wait_for(loop.sock_recv(s, 65535), left)
                except TimeoutError:
                    self.stats.timeouts += 1
                    return None
                except ConnectionRefusedError:
                    return None
                # only the answer to this question counts (a late or forged one does not)
                if (
                    len(data) >= 12 + len(q.question)
                    and struct.unpack_from("!H", data)[0] == qid
                    and data[2] & 0x80
                    and data[12 : 12 + len(q.question)].lower() == q.question.lower()
                ):
                    return data
        finally:
            s.close()

    async def _tcp(self, host: str, port: int, out: bytes, qid: int) -> bytes | None:
        self.stats.requests += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.timeout
            )
        except TimeoutError:
            self.stats.timeouts += 1
            return None
        try:
            writer.write(struct.pack("!H", len(out)) + out)
            await writer.drain()
            n = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), self.timeout))[0]
            data = await asyncio.wait_for(reader.readexactly(n), self.timeout)
            if len(data) < 12 or struct.unpack_from("!H", data)[0] != qid:
                return None
            return data
        except TimeoutError:
            self.stats.timeouts += 1
            return None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def resolve(self, name: bytes, qtype: int) -> bytes | None:
        """Ask the upstreams for `name`/`qtype` ourselves (an ExternalName's target)."""
        qid = random.getrandbits(16)
        question = name + struct.pack("!HH", qtype, wire.CLASS_IN)
        raw = wire.header(qid, 0x0100, 1, 0, 0, 1) + question + wire.opt_rr()
        q = wire.parse_query(raw)
        hit = self.cached(q, tcp=True)
        if hit is not None:
            return hit
        ans = await self.ask(raw, q)
        if ans is not None:
            self._store(q, ans)
        return ans
