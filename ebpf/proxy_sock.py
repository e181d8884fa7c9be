"""The eBPF proxy's socket programs (ebpf/proxy_sock.c): loaded, attached, and fed.

`SockLB` compiles the source with BCC, pins its maps under
/sys/fs/bpf/corral/<node>/ (a restarted proxy reuses them: same map ids,
entries kept, traffic translated through the restart), attaches the four
sock_addr programs to the node's cgroup2 directory (the caller says which:
/sys/fs/cgroup/unified/corral/<node>, never the root), and writes service
entries: for each changed service port the backends go in under a fresh
generation (one batch), then the service entry switches to it (one batch),
then the old generation's entries go (one batch). Unchanged services are
never touched. `read_kernel()` rebuilds what is programmed from the pinned
maps, so a restarted proxy diffs against the kernel, not against nothing.

Services come as plain records, service name -> {(VIP, port, protocol):
`Entry`}; the proxy turns its views into them (proxy/ebpf.py). The maps are
`pinned_map.BpfMap`s over the load's tables, typed by the C structs below.

Blocking: proxy/ebpf.py calls this in an executor.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from corral.ebpf import libbpf, loader, pinned_map, pod_cgroups
from corral.ebpf.pinned_map import (
    BPF_F_NO_PREALLOC,
    HASH,
    LRU_HASH,
    BpfMap,
    MapSpec,
    ip_key,
    ip_of,
)

log = logging.getLogger(__name__)

SOURCE = "proxy_sock.c"
PROGRAMS = {
    "corral_conn4": "connect4",
    "corral_send4": "sendmsg4",
    "corral_recv4": "recvmsg4",
    "corral_peer4": "getpeername4",
}
PROTOCOLS = {"TCP": 6, "UDP": 17}  # SCTP stays on the node's DNAT rules
SVC_AFFINITY = 1
MAX_BACKENDS = 0xFFFF

SvcKey = tuple[str, int, str]  # (VIP, port, protocol)


@dataclass(frozen=True)
class Entry:
    """What one service port's map entries say."""

    backends: tuple[tuple[str, int], ...]  # (IP, port), sorted, at most MAX_BACKENDS; () refuses
    affinity: int | None = None  # ClientIP affinity's idle timeout in seconds; None: none


# the C structs of proxy_sock.c, field for field
def _struct(name: str, fields: list[tuple[str, Any]]) -> Any:
    return type(name, (ctypes.Structure,), {"_fields_": fields})


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
SvcKeyC = _struct("svc_key", [("vip", u32), ("port", u16), ("proto", u8), ("pad", u8)])
Svc = _struct(
    "svc", [("gen", u32), ("count", u16), ("flags", u16), ("timeout", u32), ("epoch", u32)]
)
BeKey = _struct("be_key", [("gen", u32), ("slot", u32)])
Backend = _struct("backend", [("ip", u32), ("port", u16), ("pad", u16)])
MemberKey = _struct("member_key", [("gen", u32), ("ip", u32), ("port", u16), ("pad", u16)])
AffKey = _struct(
    "aff_key", [("client", u64), ("vip", u32), ("port", u16), ("proto", u8), ("epoch", u8)]
)
Aff = _struct("aff", [("word", u64)])
RevKey = _struct("rev_key", [("cookie", u64), ("ip", u32), ("port", u16), ("pad", u16)])
Rev = _struct("rev", [("vip", u32), ("port", u16), ("pad", u16)])

SPECS = {
    s.name: s
    for s in (
        MapSpec("proxy_svc", HASH, SvcKeyC, Svc, 131072, BPF_F_NO_PREALLOC),
        MapSpec("proxy_be", HASH, BeKey, Backend, 524288, BPF_F_NO_PREALLOC),
        MapSpec("proxy_member", HASH, MemberKey, u8, 524288, BPF_F_NO_PREALLOC),
        MapSpec("proxy_aff", LRU_HASH, AffKey, Aff, 65536),
        MapSpec("proxy_rev", LRU_HASH, RevKey, Rev, 65536),
    )
}
MAPS = tuple(SPECS)  # the proxy's pins


def cgroup2_missing() -> str | None:
    """Why there is no cgroup2 hierarchy to attach to, or None."""
    root = loader.CGROUP2_ROOT
    with contextlib.suppress(OSError):
        if libbpf.statfs_type(root) == loader.CGROUP2_SUPER_MAGIC:
            return None
    return (
        f"no cgroup2 hierarchy at {root}: mount one "
        f"(mount -t cgroup2 none {root}) or use --mode iptables"
    )


@dataclass
class _Have:
    gen: int
    entry: Entry
    epoch: int  # generation at which affinity was switched on (0: off)


class SockLB:
    """The loaded programs and their pinned maps, for one node.

    `cgroup` is the node's cgroup2 directory, where the programs attach (every
    pod of the node lives below it).
    """

    def __init__(self, node: str, cgroup: str) -> None:
        self.node = node
        self.cgroup = cgroup
        self.progs: loader.CgroupPrograms | None = None
        self.maps: dict[str, BpfMap] = {}
        self.have: dict[SvcKey, _Have] | None = None  # None: not read from the kernel yet
        self._next_gen = 1
        self._owner: dict[SvcKey, str] = {}  # which service a port entry belongs to
        self._orphans: set[int] = set()
        self._used: set[int] = set()  # generations a service points at
        self.batches = 0  # batch syscalls issued (for tests and the debug dump)

    # ------------------------------------------------------------ load and attach

    def load(self) -> None:
        """Compile and load (about a second of CPU); BPFUnavailable says why not."""
        m = pod_cgroups.open_map(self.node)  # the runtime's map: exists before BCC pins
        if m is not None:
            m.close()
        try:
            self.progs = loader.CgroupPrograms(SOURCE, PROGRAMS, node=self.node)
        except loader.PinLayoutError as e:
            # our own maps pinned with another layout (an upgrade): start them afresh;
            # pods reach services through the node's DNAT rules until the first sync
            if not set(e.stale) <= set(MAPS):
                raise
            log.warning("%s: unpinning %s and creating it anew", e, ", ".join(e.stale))
            for name in e.stale:
                pinned_map.unpin(os.path.join(loader.pin_dir(self.node), name))
            self.progs = loader.CgroupPrograms(SOURCE, PROGRAMS, node=self.node)
        try:
            self.maps = {name: self.progs.open_map(spec) for name, spec in SPECS.items()}
            self.maps[pod_cgroups.MAP] = self.progs.open_map(pod_cgroups.SPEC)
        except OSError as e:
            self.close()
            raise loader.BPFUnavailable(f"proxy maps: {e}") from e

    def attach(self) -> dict[str, str]:
        """Put every program on the node's cgroup (atomic replace of an earlier load's)."""
        assert self.progs is not None, "load() first"
        os.makedirs(self.cgroup, exist_ok=True)
        return {name: self.progs.attach(self.cgroup, name) for name in PROGRAMS}

    def attached_ok(self) -> bool:
        """Every program of ours is on the node's cgroup (the eBPF canary)."""
        try:
            names = {p.name for p in loader.cgroup_programs(self.cgroup)}
        except loader.CgroupError:
            return False
        return set(PROGRAMS) <= names

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}
        if self.progs is not None:
            self.progs.close()
            self.progs = None

    def map_id(self, name: str) -> int:
        return self.maps[name].id

    # ------------------------------------------------------------ maps

    def read_kernel(self) -> dict[SvcKey, _Have]:
        """What the pinned maps program now (after a restart: the previous run's entries)."""
        by_gen: dict[int, dict[int, tuple[str, int]]] = {}
        for k, v in self.maps["proxy_be"].items():
            by_gen.setdefault(k.gen, {})[k.slot] = (ip_of(v.ip), socket.ntohs(v.port))
        names = {n: p for p, n in PROTOCOLS.items()}
        have: dict[SvcKey, _Have] = {}
        top = 0
        for k, v in self.maps["proxy_svc"].items():
            slots = by_gen.get(v.gen, {})
            backends = tuple(sorted(slots[i] for i in range(v.count) if i in slots))
            aff = v.timeout if v.flags & SVC_AFFINITY else None
            key = (ip_of(k.vip), socket.ntohs(k.port), names.get(k.proto, str(k.proto)))
            have[key] = _Have(v.gen, Entry(backends, aff), v.epoch)
            top = max(top, v.gen)
        self._orphans = {g for g in by_gen if g not in {h.gen for h in have.values()}}
        top = max([top, *by_gen])
        self._next_gen = top + 1 if top < 0xFFFFFFFF else 1
        self._used = {h.gen for h in have.values()}
        self.have = have
        return have

    def _gen(self) -> int:
        used = self._used
        g = self._next_gen
        while g == 0 or g in used:
            g = (g + 1) & 0xFFFFFFFF
        self._next_gen = (g + 1) & 0xFFFFFFFF
        used.add(g)
        return g

    def apply(self, want: Mapping[SvcKey, Entry | None]) -> int:
        """Program these service ports (None: remove); untouched ports stay. Entries written."""
        if self.have is None:
            self.read_kernel()
        assert self.have is not None
        be_items: list[tuple[Any, Any]] = []
        member_items: list[tuple[Any, int]] = []
        svc_items: list[tuple[Any, Any]] = []
        svc_gone, old = [], []
        for key, entry in want.items():
            had = self.have.get(key)
            if entry is None:
                if had is not None:
                    svc_gone.append(_svc_key(key))
                    old.append(had)
                    del self.have[key]
                continue
            if had is not None and had.entry == entry:
                continue
            gen = self._gen()
            for slot, (ip, port) in enumerate(entry.backends):
                b = Backend(ip_key(ip), socket.htons(port))
                be_items.append((BeKey(gen, slot), b))
                member_items.append((MemberKey(gen, b.ip, b.port), 1))
            v = Svc(gen, len(entry.backends))
            v.flags = SVC_AFFINITY if entry.affinity is not None else 0
            v.timeout = entry.affinity or 0
            # affinity's epoch: kept while affinity stays on, new when it is switched on,
            # so clients remembered before it was off are not honoured again
            kept = had is not None and had.entry.affinity is not None and had.epoch
            v.epoch = (had.epoch if kept else gen) if entry.affinity is not None else 0
            svc_items.append((_svc_key(key), v))
            if had is not None:
                old.append(had)
            self.have[key] = _Have(gen, entry, v.epoch)
        # new backends before the service points at them; the old ones after it moved on
        for name, items in (("proxy_be", be_items), ("proxy_member", member_items),
                            ("proxy_svc", svc_items)):  # fmt: skip
            if items:
                self.maps[name].update_batch(items)
                self.batches += 1
        if svc_gone:
            self.maps["proxy_svc"].delete_batch(svc_gone)
            self.batches += 1
        self._used.difference_update(h.gen for h in old)
        self._free(old, self._orphans)
        self._orphans = set()
        return len(be_items) + len(svc_items) + len(svc_gone)

    def _free(self, old: Iterable[_Have], gens: set[int]) -> None:
        be, member = self.maps["proxy_be"], self.maps["proxy_member"]
        be_keys, member_keys = [], []
        for h in old:
            for slot, (ip, port) in enumerate(h.entry.backends):
                be_keys.append(BeKey(h.gen, slot))
                member_keys.append(MemberKey(h.gen, ip_key(ip), socket.htons(port)))
        if gens:  # generations nobody points at (a crash between two batches)
            be_keys += [k for k in be if k.gen in gens]
            member_keys += [k for k in member if k.gen in gens]
        for m, keys in ((be, be_keys), (member, member_keys)):
            if keys:
                m.delete_batch(keys)
                self.batches += 1

    def sync(
        self, services: Mapping[str, Mapping[SvcKey, Entry]], changed: Iterable[str] | None
    ) -> int:
        """Program the changed services (None: every one, and remove ports nobody wants).

        `services` maps a service's name to its ports' entries; a changed name
        it lacks is a service gone.
        """
        if changed is None or self.have is None:
            self.read_kernel()
            assert self.have is not None
            want: dict[SvcKey, Entry | None] = dict.fromkeys(self.have)
            self._owner = {}
            for name, got in services.items():
                want.update(got)
                self._owner.update(dict.fromkeys(got, name))
            return self.apply(want)
        keys = set(changed)
        # a changed service's ports that are gone (service deleted, VIP or port changed)
        want = {k: None for k, owner in self._owner.items() if owner in keys}
        for k in want:
            del self._owner[k]
        for name in keys:
            got = services.get(name, {})
            want.update(got)
            self._owner.update(dict.fromkeys(got, name))
        return self.apply(want)

    def map_memory(self) -> dict[str, int]:
        """Kernel memory of each map (bytes, from its fd's `memlock`)."""
        return {name: m.memlock() for name, m in self.maps.items()}


def _svc_key(key: SvcKey) -> Any:
    ip, port, proto = key
    return SvcKeyC(ip_key(ip), socket.htons(port), PROTOCOLS[proto])


def remove_all(node: str, cgroup: str) -> list[str]:
    """Detach the programs from the node's cgroup and unpin the proxy's maps (--cleanup).

    pod_cgroups stays: it is the node runtime's (its entries describe running pods).
    """
    done = []
    with contextlib.suppress(loader.CgroupError):
        for p in loader.detach_cgroup(cgroup, names=list(PROGRAMS)):
            done.append(f"eBPF program {p.name} ({p.hook}) from {cgroup}")
    with contextlib.suppress(ValueError):
        d = loader.pin_dir(node)
        for name in MAPS:
            path = os.path.join(d, name)
            if pinned_map.unpin(path):
                done.append(f"pinned map {path}")
    return done


__all__ = ["Entry", "SockLB", "SvcKey", "cgroup2_missing", "remove_all"]
