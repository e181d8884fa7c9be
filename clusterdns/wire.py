"""The DNS wire format, as much of it as a cluster DNS server needs (RFC 1035, 6891).

Parsing is strict and bounded: every offset is checked, compression pointers must
point backwards, and names are at most 255 bytes, so a hostile packet raises
`FormErr` (answerable) or `Drop` (not worth an answer), never anything else.
Names are handled in wire form (`b"\\x03svc\\x07default..."`); the index keys
them lower-cased.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

A, NS, CNAME, SOA, PTR, TXT, AAAA, SRV, OPT, ANY = 1, 2, 5, 6, 12, 16, 28, 33, 41, 255
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended rcode (EDNS version not supported)

TYPE_NAMES = {A: "A", NS: "NS", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", TXT: "TXT"}
TYPE_NAMES.update({AAAA: "AAAA", SRV: "SRV", OPT: "OPT", ANY: "ANY", 15: "MX", 65: "HTTPS"})
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP"}
RCODE_NAMES.update({5: "REFUSED", 16: "BADVERS"})

UDP_PLAIN = 512  # the limit of a UDP answer to a query without EDNS
OUR_UDP_SIZE = 1232  # what we advertise (the DNS flag day 2020 figure)
MAX_UDP_SIZE = 4096  # the most we send over UDP, whatever a client advertises

_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_HDR = struct.Struct("!HHHHHH")


class Drop(Exception):
    """Not worth an answer (too short for a header, or itself a response)."""


class FormErr(Exception):
    """Malformed; answer FORMERR with this header."""

    def __init__(self, qid: int, flags: int, why: str) -> None:
        super().__init__(why)
        self.qid, self.flags = qid, flags


def type_name(t: int) -> str:
    return TYPE_NAMES.get(t, f"TYPE{t}")


# ------------------------------------------------------------------ names


def encode_name(name: str) -> bytes:
    """`svc.ns.svc.cluster.local` (trailing dot optional) -> wire form; ValueError if
    a label is empty or too long or the name longer than 255 bytes."""
    name = name.rstrip(".")
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise ValueError(f"{name!r}: label {label!r} must be 1-63 characters")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"{name!r} is longer than 255 bytes")
    return bytes(out)


def decode_name(wire: bytes) -> str:
    """Wire form (uncompressed) -> dotted text with a trailing dot."""
    labels = []
    i = 0
    while wire[i]:
        n = wire[i]
        labels.append(wire[i + 1 : i + 1 + n].decode("ascii", "backslashreplace"))
        i += 1 + n
    return ".".join(labels) + "."


def labels_of(wire: bytes) -> list[bytes]:
    out = []
    i = 0
    while wire[i]:
        n = wire[i]
        out.append(wire[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def join_labels(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\x00"


def read_name(msg: bytes, off: int) -> tuple[bytes, int]:
    """The (decompressed) name at `off` and the offset after it. Pointers must go
    backwards, so a loop is impossible; ValueError on anything malformed."""
    out = bytearray()
    end = -1
    pos = off
    limit = off  # a pointer must point before the last place it was found
    while True:
        if pos >= len(msg):
            raise ValueError("name runs past the end")
        n = msg[pos]
        if n == 0:
            out.append(0)
            if end < 0:
                end = pos + 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                raise ValueError("pointer runs past the end")
            target = ((n & 0x3F) << 8) | msg[pos + 1]
            if target >= limit:
                raise ValueError("compression pointer does not point backwards")
            if end < 0:
                end = pos + 2
            limit = target
            pos = target
            continue
        if n & 0xC0:
            raise ValueError("unknown label type")
        if pos + 1 + n > len(msg):
            raise ValueError("label runs past the end")
        out += msg[pos : pos + 1 + n]
        if len(out) > 254:
            raise ValueError("name longer than 255 bytes")
        pos += 1 + n
    return bytes(out), end


# ------------------------------------------------------------------ queries


@dataclass(slots=True)
class Query:
    id: int
    flags: int
    qname: bytes  # as sent (case kept)
    key: bytes  # qname lower-cased
    qtype: int
    qclass: int
    question: bytes  # the question section as sent: echoed back in the answer
    edns: bool = False
    udp_size: int = UDP_PLAIN
    edns_version: int = 0
    do: bool = False

    @property
    def rd(self) -> bool:
        return bool(self.flags & 0x0100)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    def limit(self, tcp: bool) -> int:
        """The largest answer this client takes."""
        if tcp:
            return 65535
        if not self.edns:
            return UDP_PLAIN
        return max(UDP_PLAIN, min(self.udp_size, MAX_UDP_SIZE))


def _skip_rr(msg: bytes, off: int) -> tuple[int, int, int, int]:
    """Skip one RR: (type, class, ttl-and-flags, offset after it)."""
    _, off = read_name(msg, off)
    if off + 10 > len(msg):
        raise ValueError("resource record runs past the end")
    rtype, rclass, ttl, rdlen = _RR.unpack_from(msg, off)
    off += 10 + rdlen
    if off > len(msg):
        raise ValueError("rdata runs past the end")
    return rtype, rclass, ttl, off


def parse_query(msg: bytes) -> Query:
    """A query with one question and an optional OPT record."""
    if len(msg) < 12:
        raise Drop("shorter than a header")
    qid, flags, qd, an, ns, ar = _HDR.unpack_from(msg)
    if flags & 0x8000:
        raise Drop("a response, not a query")
    if qd != 1:
        raise FormErr(qid, flags, f"{qd} questions (one is allowed)")
    try:
        qname, off = read_name(msg, 12)
        if off + 4 > len(msg):
            raise ValueError("question runs past the end")
        qtype, qclass = struct.unpack_from("!HH", msg, off)
        off += 4
        q = Query(qid, flags, qname, qname.lower(), qtype, qclass, msg[12:off])
        for _ in range(an + ns):
            *_, off = _skip_rr(msg, off)
        for _ in range(ar):
            start = off
            rtype, rclass, ttl, off = _skip_rr(msg, off)
            if rtype == OPT:
                if q.edns or msg[start] != 0:
                    raise ValueError("more than one OPT record, or one not at the root")
                q.edns = True
                q.udp_size = rclass
                q.edns_version = (ttl >> 16) & 0xFF
                q.do = bool(ttl & 0x8000)
        if off != len(msg):
            raise ValueError(f"{len(msg) - off} bytes after the last record")
    except (ValueError, struct.error) as e:
        raise FormErr(qid, flags, str(e)) from None
    return q


# ------------------------------------------------------------------ answers


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    """One resource record; `owner` is a wire name or a compression pointer."""
    return owner + _RR.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


QNAME_PTR = b"\xc0\x0c"  # the question's name, always at offset 12


def opt_rr(ext_rcode: int = 0) -> bytes:
    return b"\x00" + _RR.pack(OPT, OUR_UDP_SIZE, (ext_rcode & 0xFF) << 24, 0)


def flags_of(q_flags: int, rcode: int, aa: bool, tc: bool = False) -> int:
    """Response flags: QR, the query's opcode and RD, RA (we forward), AA, TC, RCODE."""
    f = 0x8000 | (q_flags & 0x7900) | 0x0080 | (rcode & 0xF)
    if aa:
        f |= 0x0400
    if tc:
        f |= 0x0200
    return f


def header(qid: int, flags: int, qd: int, an: int, ns: int, ar: int) -> bytes:
    return _HDR.pack(qid, flags, qd, an, ns, ar)


@dataclass(slots=True)
class Section:
    data: bytes = b""
    count: int = 0

    def __add__(self, other: Section) -> Section:
        return Section(self.data + other.data, self.count + other.count)


EMPTY = Section()


def build(
    q: Query,
    rcode: int,
    *,
    aa: bool,
    answer: Section = EMPTY,
    authority: Section = EMPTY,
    additional: Section = EMPTY,
    tcp: bool = False,
) -> bytes:
    """The answer to `q`, truncated to header + question with TC when it does not fit."""
    ar = additional.count
    tail = b""
    if q.edns:
        tail = opt_rr(rcode >> 4)
        ar += 1
    msg = (
        header(q.id, flags_of(q.flags, rcode, aa), 1, answer.count, authority.count, ar)
        + q.question
        + answer.data
        + authority.data
        + additional.data
        + tail
    )
    if len(msg) <= q.limit(tcp):
        return msg
    return (
        header(q.id, flags_of(q.flags, rcode, aa, tc=True), 1, 0, 0, 1 if q.edns else 0)
        + q.question
        + tail
    )


def error(qid: int, q_flags: int, rcode: int, question: bytes = b"", edns: bool = False) -> bytes:
    """A bare error answer (FORMERR, NOTIMP, REFUSED, SERVFAIL, BADVERS)."""
    tail = opt_rr(rcode >> 4) if edns else b""
    return (
        header(
            qid, flags_of(q_flags, rcode, aa=False), 1 if question else 0, 0, 0, 1 if edns else 0
        )
        + question
        + tail
    )


# ------------------------------------------------------------------ rdata


def a_rdata(ip: str) -> bytes:
    return bytes(int(x) for x in ip.split("."))


def srv_rdata(priority: int, weight: int, port: int, target: bytes) -> bytes:
    return struct.pack("!HHH", priority, weight, port) + target


def txt_rdata(*strings: str) -> bytes:
    out = b""
    for s in strings:
        raw = s.encode()
        out += bytes([len(raw)]) + raw
    return out


def soa_rdata(mname: bytes, rname: bytes, serial: int, minimum: int) -> bytes:
    return mname + rname + struct.pack("!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, minimum)


# ------------------------------------------------------------------ reading answers


@dataclass(slots=True)
class Record:
    name: bytes  # decompressed
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes  # names inside decompressed for the types that carry them
    ttl_offset: int  # where its TTL sits in the message (for rewriting cached answers)


_NAME_RDATA = {NS, CNAME, PTR, 39}  # DNAME too


def parse_response(msg: bytes) -> tuple[int, int, list[list[Record]]]:
    """(flags, rcode incl. extended, [answer, authority, additional]) of an answer;
    ValueError if malformed. The OPT record is left out of the sections."""
    if len(msg) < 12:
        raise ValueError("shorter than a header")
    _, flags, qd, an, ns, ar = _HDR.unpack_from(msg)
    off = 12
    for _ in range(qd):
        _, off = read_name(msg, off)
        off += 4
    rcode = flags & 0xF
    sections: list[list[Record]] = [[], [], []]
    for i, count in enumerate((an, ns, ar)):
        for _ in range(count):
            name, off = read_name(msg, off)
            if off + 10 > len(msg):
                raise ValueError("record runs past the end")
            rtype, rclass, ttl, rdlen = _RR.unpack_from(msg, off)
            ttl_off = off + 4
            start = off + 10
            off = start + rdlen
            if off > len(msg):
                raise ValueError("rdata runs past the end")
            if rtype == OPT:
                rcode |= ((ttl >> 24) & 0xFF) << 4
                continue
            rdata = msg[start:off]
            if rtype in _NAME_RDATA:
                rdata, _ = read_name(msg, start)
            elif rtype == SRV:
                rdata = msg[start : start + 6] + read_name(msg, start + 6)[0]
            elif rtype == 15:  # MX
                rdata = msg[start : start + 2] + read_name(msg, start + 2)[0]
            elif rtype == SOA:
                m, o = read_name(msg, start)
                r, o = read_name(msg, o)
                rdata = m + r + msg[o : o + 20]
            sections[i].append(Record(name, rtype, rclass, ttl, rdata, ttl_off))
    return flags, rcode, sections
