"""The cluster zone as an in-memory index of pre-rendered answers.

`records_of(service, slices, zone)` says which names a Service owns and what is at
them (Kubernetes DNS-Based Service Discovery 1.1.0, and CoreDNS's habits where the
spec is silent); `ZoneIndex.set_service` swaps one Service's names for new ones.
Each (name, type) holds its answer section already in wire form (owner = a
pointer to the question), so an answer is a header, the question as the client
sent it (its case echoed) and these bytes; `fast` maps the lower-cased question
straight to them for the server's hot path.

Names are wire-form and lower-cased. A name exists when it has records or when a
name below it does (an empty non-terminal, `<ns>.svc.<zone>`): that is the
NXDOMAIN / NODATA line. PTR names (`in-addr.arpa`) live in the same table but
outside the zone; an IP behind several Services gets one PTR: a headless
endpoint's name first (ClusterIP Services' endpoints get none), then the smallest.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from corral.clusterdns import wire
from corral.clusterdns.views import ServiceInfo, SliceInfo
from corral.clusterdns.wire import AAAA, CNAME, NS, PTR, SOA, SRV, TXT, A, Section

SCHEMA_VERSION = "1.1.0"

# rdata per type per name: what one owner (a Service, or the apex) contributes
Names = dict[bytes, dict[int, list[bytes]]]


def ip_rtype(ip: str) -> int:
    return A if ":" not in ip else AAAA


def ip_rdata(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def reverse_name(ip: str) -> bytes:
    return wire.encode_name(ipaddress.ip_address(ip).reverse_pointer).lower()


def dashed(ip: str) -> str:
    """An endpoint without a hostname is named after its IP: 10-244-1-5 (CoreDNS's way)."""
    return ip.replace(".", "-").replace(":", "-")


@dataclass
class Owned:
    """What one Service puts in the zone."""

    names: Names = field(default_factory=dict)
    ptrs: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # ip -> (rank, target)

    def add(self, name: bytes, rtype: int, rdata: bytes) -> None:
        rds = self.names.setdefault(name, {}).setdefault(rtype, [])
        if rdata not in rds:
            rds.append(rdata)


def records_of(svc: ServiceInfo, slices: Iterable[SliceInfo], zone: bytes) -> Owned:
    """Every record of one Service (`zone` in wire form, lower case)."""
    out = Owned()
    base = wire.encode_name(f"{svc.name}.{svc.namespace}.svc")[:-1] + zone
    if svc.type == "ExternalName":
        if svc.external_name:
            out.add(base, CNAME, wire.encode_name(svc.external_name.lower()))
        return out
    if svc.headless:
        _headless(out, svc, list(slices), base)
        return out
    if not svc.cluster_ips:
        return out  # no VIP allocated yet: nothing to serve
    for ip in svc.cluster_ips:
        out.add(base, ip_rtype(ip), ip_rdata(ip))
        out.ptrs[ip] = (1, base)
    for name, port, proto in svc.ports:
        if name:
            out.add(_port_name(name, proto, base), SRV, wire.srv_rdata(0, 100, port, base))
    return out


def _port_name(port: str, proto: str, base: bytes) -> bytes:
    return wire.join_labels([b"_" + port.encode(), b"_" + proto.lower().encode()])[:-1] + base


def _headless(out: Owned, svc: ServiceInfo, slices: list[SliceInfo], base: bytes) -> None:
    publish = svc.publish_not_ready
    ready: list[tuple[str, bytes, SliceInfo]] = []  # (ip, endpoint name, its slice)
    for s in sorted(slices, key=lambda s: s.name):
        if s.address_type == "FQDN":
            continue
        for addresses, is_ready, hostname in s.endpoints:
            if not (is_ready or publish):
                continue
            for ip in addresses:
                label = (hostname or dashed(ip)).lower()
                ready.append((ip, wire.encode_name(label)[:-1] + base, s))
    for ip, epname, _ in ready:
        out.add(base, ip_rtype(ip), ip_rdata(ip))
        out.add(epname, ip_rtype(ip), ip_rdata(ip))
        rank = (0, epname)
        if ip not in out.ptrs or rank < out.ptrs[ip]:
            out.ptrs[ip] = rank
    per_port: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
    for _, epname, s in ready:
        for name, port, proto in s.ports:
            if name:
                per_port.setdefault((name, proto), []).append((port, epname))
    for (pname, proto), targets in per_port.items():
        uniq = sorted(set(targets), key=lambda t: (t[1], t[0]))
        weight = max(1, 100 // len(uniq))
        for port, epname in uniq:
            out.add(_port_name(pname, proto, base), SRV, wire.srv_rdata(0, weight, port, epname))


# One (name, type): the answer's headers (flags + counts, without the ID) indexed by
# RD | EDNS << 1; the answer and additional records as one run of bytes (our OPT
# record goes after it when the query had one); the type; the two counts. The same
# tuple is the fast path's entry (`ZoneIndex.fast`, fastpath.c reads items 0-5).
Entry = tuple[bytes, bytes, bytes, bytes, bytes, int, int, int]
TAIL, TYPE, AN, AR = 4, 5, 6, 7


def sections(e: Entry) -> tuple[Section, Section]:
    """An entry's answer and additional sections, apart."""
    tail, pos = e[TAIL], 0
    for _ in range(e[AN]):  # answer records: a 2-byte pointer owner, then 10 + rdlen
        pos += 12 + int.from_bytes(tail[pos + 10 : pos + 12], "big")
    return Section(tail[:pos], e[AN]), Section(tail[pos:], e[AR])


class ZoneIndex:
    def __init__(self, zone: str, ttl: int, *, dns_ip: str | None = None) -> None:
        self.zone = zone.lower().strip(".")
        self.zone_wire = wire.encode_name(self.zone)
        self.zone_labels = wire.labels_of(self.zone_wire)
        self.ttl = ttl
        self.serial = int(time.time())
        self.names: dict[bytes, dict[int, Entry]] = {}
        self.ents: dict[bytes, int] = {}  # name -> how many names below it exist
        self.fast: dict[bytes, Entry] = {}
        self._owned: dict[str, tuple[int, tuple[bytes, ...], dict[str, tuple[int, bytes]]]] = {}
        self._heads: dict[tuple[int, int], tuple[bytes, ...]] = {}  # shared fast-path headers
        self._ptr_candidates: dict[str, dict[str, tuple[int, bytes]]] = {}
        self._ptr_chosen: dict[str, bytes] = {}
        self.changes = 0
        self.soa_rdata = wire.soa_rdata(
            wire.encode_name("ns.dns." + self.zone),
            wire.encode_name("hostmaster." + self.zone),
            self.serial,
            ttl,
        )
        # The negative answers' authority section: the zone's SOA, negative TTL = its TTL.
        self.soa_authority = Section(wire.rr(self.zone_wire, SOA, ttl, self.soa_rdata), 1)
        apex = Owned()
        apex.add(self.zone_wire, SOA, self.soa_rdata)
        apex.add(self.zone_wire, NS, wire.encode_name("ns.dns." + self.zone))
        apex.add(wire.encode_name("dns-version." + self.zone), TXT, wire.txt_rdata(SCHEMA_VERSION))
        if dns_ip:
            apex.add(wire.encode_name("ns.dns." + self.zone), ip_rtype(dns_ip), ip_rdata(dns_ip))
        self.set_owner("", apex)

    # ------------------------------------------------------------ reading

    def in_zone(self, key: bytes) -> bool:
        """`key` (lower-cased wire name) is the zone or below it, on a label boundary."""
        z = self.zone_wire
        if not key.endswith(z):
            return False
        cut = len(key) - len(z)
        i = 0
        while i < cut:
            i += 1 + key[i]
        return i == cut

    def exists(self, key: bytes) -> bool:
        return key in self.names or key in self.ents

    @property
    def size(self) -> int:
        """Resource records in the index."""
        return sum(e[AN] for node in self.names.values() for e in node.values())

    @property
    def services(self) -> int:
        return sum(1 for k in self._owned if k)

    # ------------------------------------------------------------ changing

    def set_service(self, key: str, svc: ServiceInfo | None, slices: Iterable[SliceInfo]) -> None:
        """Replace what Service `key` (ns/name) owns; None removes it."""
        self.set_owner(key, records_of(svc, slices, self.zone_wire) if svc else Owned())

    def set_owner(self, key: str, new: Owned) -> None:
        # What an owner had is kept as (digest, its names, its PTRs): the rdata itself
        # lives rendered in `names` only (at 10,000 Services the plain copy cost 7 MB).
        digest = hash(repr(sorted((n, sorted(r.items())) for n, r in new.names.items())))
        old_digest, old_names, old_ptrs = self._owned.pop(key, None) or (None, (), {})
        if new.names or new.ptrs:
            self._owned[key] = (digest, tuple(new.names), dict(new.ptrs))
        if old_digest == digest and old_ptrs == new.ptrs:
            return
        self.changes += 1
        for name in set(old_names) - new.names.keys():
            self._drop_name(name)
        for name, rrsets in new.names.items():  # all: an SRV's additional A may have changed
            self._put_name(name, rrsets, new.names)
        touched = set()
        for ip in old_ptrs.keys() | new.ptrs.keys():
            cands = self._ptr_candidates.setdefault(ip, {})
            if ip in new.ptrs:
                cands[key] = new.ptrs[ip]
            else:
                cands.pop(key, None)
            touched.add(ip)
        for ip in touched:
            self._choose_ptr(ip)

    def _choose_ptr(self, ip: str) -> None:
        cands = self._ptr_candidates.get(ip) or {}
        if not cands:
            self._ptr_candidates.pop(ip, None)
        want = min(cands.values())[1] if cands else None
        have = self._ptr_chosen.get(ip)
        if want == have:
            return
        name = reverse_name(ip)
        if want is None:
            del self._ptr_chosen[ip]
            self._ptr_candidates.pop(ip, None)
            self._drop_name(name)
        else:
            self._ptr_chosen[ip] = want
            self._put_name(name, {PTR: [want]}, {})

    def _render(self, rtype: int, rdatas: list[bytes], names: Names) -> Entry:
        ttl = self.ttl
        tail = b"".join(wire.rr(wire.QNAME_PTR, rtype, ttl, rd) for rd in sorted(rdatas))
        count = 0
        if rtype == SRV:  # the targets' addresses, as CoreDNS gives them
            for target in dict.fromkeys(rd[6:] for rd in sorted(rdatas)):
                for t in (A, AAAA):
                    for rd in sorted(names.get(target, {}).get(t, [])):
                        tail += wire.rr(target, t, ttl, rd)
                        count += 1
        an, ar = len(rdatas), count
        heads = self._heads.get((an, ar))
        if heads is None:
            hs = []
            for edns in (0, 1):
                for rd in (0, 1):
                    flags = wire.flags_of(0x0100 * rd, wire.NOERROR, aa=True)
                    hs.append(struct.pack("!HHHHH", flags, 1, an, 0, ar + edns))
            heads = self._heads[(an, ar)] = tuple(hs)
        return (heads[0], heads[1], heads[2], heads[3], tail, rtype, an, ar)

    def _put_name(self, name: bytes, rrsets: dict[int, list[bytes]], names: Names) -> None:
        fresh = name not in self.names
        old = self.names.get(name, {})
        node = {t: self._render(t, rds, names) for t, rds in rrsets.items()}
        self.names[name] = node
        for t in old.keys() - node.keys():
            self.fast.pop(name + struct.pack("!HH", t, 1), None)
        for t, e in node.items():
            key = name + struct.pack("!HH", t, 1)
            # CNAMEs are chased and answers that may not fit are truncated: the full path
            if t == CNAME or len(key) + 12 + len(e[TAIL]) + 11 > wire.UDP_PLAIN:
                self.fast.pop(key, None)
            else:
                self.fast[key] = e
        if fresh:
            for anc in self._ancestors(name):
                self.ents[anc] = self.ents.get(anc, 0) + 1

    def _drop_name(self, name: bytes) -> None:
        node = self.names.pop(name, None)
        if node is None:
            return
        for t in node:
            self.fast.pop(name + struct.pack("!HH", t, 1), None)
        for anc in self._ancestors(name):
            n = self.ents.get(anc, 0) - 1
            if n > 0:
                self.ents[anc] = n
            else:
                self.ents.pop(anc, None)

    def _ancestors(self, name: bytes) -> list[bytes]:
        """The names above `name` down to the zone apex (none outside the zone)."""
        if not self.in_zone(name):
            return []
        out = []
        i = 0
        while len(name) - i > len(self.zone_wire):
            i += 1 + name[i]
            out.append(name[i:])
        return out

    def lookup(self, key: bytes) -> dict[int, Entry] | None:
        return self.names.get(key)
