"""Answering one parsed query: the cluster zone from the index, the rest forwarded.

`Resolver.answer(q, raw, tcp)` returns the answer's bytes, or a coroutine when
it has to ask the upstreams (out of the zone, or an ExternalName's target).
This is the full path; the server's fast path answers the hot names straight
from `ZoneIndex.fast` and agrees with it byte for byte.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from corral.clusterdns import wire
from corral.clusterdns.forward import Forwarder
from corral.clusterdns.records import TAIL, Entry, ZoneIndex, sections
from corral.clusterdns.wire import ANY, CNAME, PTR, Query, Section

POD_MODES = ("disabled", "insecure", "verified")
MAX_CHASE = 8

Answer = bytes | Coroutine[Any, Any, bytes]


def pod_ip(label: bytes) -> str | None:
    """`10-244-1-5` -> 10.244.1.5 (None unless it is a dashed IPv4 address)."""
    try:
        ip = ipaddress.IPv4Address(label.decode("ascii").replace("-", "."))
    except (ValueError, UnicodeDecodeError):
        return None
    return str(ip)


def reown(data: bytes, owner: bytes) -> bytes:
    """Rendered records whose owner is the question's name, given `owner` instead."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        (rdlen,) = struct.unpack_from("!H", data, pos + 10)
        out += owner + data[pos + 2 : pos + 12 + rdlen]
        pos += 12 + rdlen
    return bytes(out)


class Resolver:
    def __init__(
        self,
        index: ZoneIndex,
        forwarder: Forwarder,
        *,
        pods: str = "insecure",
        pod_exists: Callable[[str, str], bool] | None = None,
    ) -> None:
        if pods not in POD_MODES:
            raise ValueError(f"--pods {pods!r}: choose from {', '.join(POD_MODES)}")
        self.index = index
        self.forwarder = forwarder
        self.pods = pods
        self.pod_exists = pod_exists or (lambda ns, ip: False)
        self.synced = False
        self.pod_label = wire.encode_name("pod")[:-1]

    # ------------------------------------------------------------ entry

    def answer(self, q: Query, raw: bytes, tcp: bool) -> Answer:
        if q.opcode != 0:
            return wire.error(q.id, q.flags, wire.NOTIMP, q.question, q.edns)
        if q.edns and q.edns_version > 0:
            return wire.error(q.id, q.flags, wire.BADVERS, q.question, True)
        if not self.synced:
            return wire.error(q.id, q.flags, wire.SERVFAIL, q.question, q.edns)
        index = self.index
        if index.in_zone(q.key):
            if q.qclass != wire.CLASS_IN:
                return wire.error(q.id, q.flags, wire.REFUSED, q.question, q.edns)
            node = index.lookup(q.key)
            if node is not None and CNAME in node and q.qtype not in (CNAME, ANY):
                return self._chase(q, node, tcp)
            return self._local(q, q.key, tcp)
        if q.qtype == PTR and q.key in index.names:
            return self._local(q, q.key, tcp)
        return self.forwarder.forward(q, raw, tcp)

    # ------------------------------------------------------------ the zone

    def _records(self, key: bytes, qtype: int) -> tuple[int, Section, Section]:
        """(rcode, answer, additional) for a name in the zone (or a known PTR)."""
        node = self.index.lookup(key)
        if node is not None:
            if qtype == ANY:
                rs: list[Entry] = list(node.values())
            else:
                r = node.get(qtype)
                rs = [r] if r is not None else []
            ans, add = Section(), Section()
            for r in rs:
                a, b = sections(r)
                ans, add = ans + a, add + b
            return wire.NOERROR, ans, add
        if key in self.index.ents:
            return wire.NOERROR, Section(), Section()
        return self._pod(key, qtype)

    def _pod(self, key: bytes, qtype: int) -> tuple[int, Section, Section]:
        """`<a-b-c-d>.<ns>.pod.<zone>`, by --pods."""
        labels = wire.labels_of(key)[: -len(self.index.zone_labels)]
        if self.pods == "disabled" or not labels or labels[-1] != b"pod":
            return wire.NXDOMAIN, Section(), Section()
        if len(labels) < 3:
            return wire.NOERROR, Section(), Section()  # pod.<zone>, <ns>.pod.<zone>
        if len(labels) > 3:
            return wire.NXDOMAIN, Section(), Section()
        ip = pod_ip(labels[0])
        if ip is None or (
            self.pods == "verified"
            and not self.pod_exists(labels[1].decode("ascii", "replace"), ip)
        ):
            return wire.NXDOMAIN, Section(), Section()
        if qtype not in (wire.A, ANY):
            return wire.NOERROR, Section(), Section()
        rdata = ipaddress.IPv4Address(ip).packed
        return (
            wire.NOERROR,
            Section(wire.rr(wire.QNAME_PTR, wire.A, self.index.ttl, rdata), 1),
            (Section()),
        )

    def _local(self, q: Query, key: bytes, tcp: bool) -> bytes:
        rcode, ans, add = self._records(key, q.qtype)
        auth = Section() if ans.count else self.index.soa_authority
        return wire.build(q, rcode, aa=True, answer=ans, authority=auth, additional=add, tcp=tcp)

    # ------------------------------------------------------------ ExternalName

    def _chase(self, q: Query, node: dict[int, Entry], tcp: bool) -> Answer:
        """The CNAME, then its target's records: from the zone, or the upstreams."""
        ans = Section()
        owner = wire.QNAME_PTR
        for _ in range(MAX_CHASE):
            cname = node[CNAME]
            target = cname[TAIL][12:]  # pointer(2) + type/class/ttl/len(10), one record
            ans += Section(wire.rr(owner, CNAME, self.index.ttl, target), 1)
            owner = target
            if not self.index.in_zone(target):
                return self._chase_out(q, ans, target, tcp)
            node = self.index.lookup(target) or {}
            if CNAME not in node:
                rcode, more, add = self._records(target, q.qtype)
                more = Section(reown(more.data, target), more.count)
                return wire.build(
                    q,
                    rcode,
                    aa=True,
                    answer=ans + more,
                    authority=Section() if more.count else self.index.soa_authority,
                    additional=add,
                    tcp=tcp,
                )
        return wire.build(q, wire.SERVFAIL, aa=False, answer=ans, tcp=tcp)

    async def _chase_out(self, q: Query, ans: Section, target: bytes, tcp: bool) -> bytes:
        upstream = await self.forwarder.resolve(target, q.qtype)
        if upstream is None:
            return wire.error(q.id, q.flags, wire.SERVFAIL, q.question, q.edns)
        try:
            _, rcode, sections = wire.parse_response(upstream)
        except (ValueError, struct.error):
            return wire.error(q.id, q.flags, wire.SERVFAIL, q.question, q.edns)
        for r in sections[0]:
            ans += Section(wire.rr(r.name, r.rtype, r.ttl, r.rdata), 1)
        return wire.build(q, rcode & 0xF, aa=False, answer=ans, tcp=tcp)
