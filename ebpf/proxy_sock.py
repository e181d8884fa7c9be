"""The eBPF proxy's socket programs (ebpf/proxy_sock.c): loaded, attached, and fed.

`SockLB` compiles the source with BCC, pins its maps under
/sys/fs/bpf/corral/<node>/ (a restarted proxy reuses them: same map ids,
entries kept, traffic translated through the restart), attaches the four
sock_addr programs to the node's cgroup2 directory
(/sys/fs/cgroup/unified/corral/<node>, never the root), and writes service
entries: for each changed service port the backends go in under a fresh
generation (one batch), then the service entry switches to it (one batch),
then the old generation's entries go (one batch). Unchanged services are
never touched. `read_kernel()` rebuilds what is programmed from the pinned
maps, so a restarted proxy diffs against the kernel, not against nothing.

Blocking: proxy/ebpf.py calls this in an executor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from corral.ebpf import loader, pod_cgroups
from corral.proxy.core import ServiceView, usable

log = logging.getLogger(__name__)

SOURCE = "proxy_sock.c"
PROGRAMS = {
    "corral_conn4": "connect4",
    "corral_send4": "sendmsg4",
    "corral_recv4": "recvmsg4",
    "corral_peer4": "getpeername4",
}
MAPS = ("proxy_svc", "proxy_be", "proxy_member", "proxy_aff", "proxy_rev")  # the proxy's pins
PROTOCOLS = {"TCP": 6, "UDP": 17}  # SCTP stays on the node's DNAT rules
SVC_AFFINITY = 1
MAX_BACKENDS = 0xFFFF

SvcKey = tuple[str, int, str]  # (VIP, port, protocol)


@dataclass(frozen=True)
class Entry:
    """What one service port's map entries say."""

    backends: tuple[tuple[str, int], ...]  # (IP, port), sorted; () refuses
    affinity: int | None = None  # idle timeout in seconds; None: no ClientIP affinity


def entries(view: ServiceView | None) -> dict[SvcKey, Entry]:
    """The map entries a service's view asks for (TCP and UDP ports with a VIP)."""
    out: dict[SvcKey, Entry] = {}
    if view is None:
        return out
    for sp in view.ports:
        if sp.protocol not in PROTOCOLS:
            continue
        eps = usable(view.endpoints_of(sp))
        backends = tuple(sorted({(e.ip, e.port) for e in eps}))[:MAX_BACKENDS]
        out[(sp.cluster_ip, sp.port, sp.protocol)] = Entry(backends, sp.affinity_timeout)
    return out


def node_cgroup(node: str) -> str:
    """The node's cgroup2 directory, where the programs attach (every pod lives below)."""
    from corral.runtime.cgroups import node_unified_dir

    return node_unified_dir(node)


def cgroup2_missing() -> str | None:
    """Why there is no cgroup2 hierarchy to attach to, or None."""
    root = loader.CGROUP2_ROOT
    try:
        if loader._statfs_type(root) == loader.CGROUP2_SUPER_MAGIC:
            return None
    except OSError:
        pass
    return (
        f"no cgroup2 hierarchy at {root}: mount one "
        f"(mount -t cgroup2 none {root}) or use --mode iptables"
    )


def _ip(v: int) -> str:
    return socket.inet_ntoa(v.to_bytes(4, "little"))


@dataclass
class _Have:
    gen: int
    entry: Entry
    epoch: int  # generation at which affinity was switched on (0: off)


class SockLB:
    """The loaded programs and their pinned maps, for one node."""

    def __init__(self, node: str, cgroup: str | None = None) -> None:
        self.node = node
        self.cgroup = cgroup or node_cgroup(node)
        self.progs: loader.CgroupPrograms | None = None
        self.have: dict[SvcKey, _Have] | None = None  # None: not read from the kernel yet
        self._next_gen = 1
        self._owner: dict[SvcKey, str] = {}  # which service a port entry belongs to
        self._orphans: set[int] = set()
        self._used: set[int] = set()  # generations a service points at
        self.batches = 0  # batch syscalls issued (for tests and the debug dump)

    # ------------------------------------------------------------ load and attach

    def load(self) -> None:
        """Compile and load (about a second of CPU); BPFUnavailable says why not."""
        fd = pod_cgroups.open_map(self.node)  # the runtime's map: exists before BCC pins
        if fd is not None:
            os.close(fd)
        try:
            self.progs = loader.CgroupPrograms(SOURCE, PROGRAMS, node=self.node)
        except loader.BPFUnavailable as e:
            # one of our own maps pinned with another layout (an upgrade): start it afresh;
            # pods reach services through the node's DNAT rules until the first sync
            stale = [m for m in MAPS if f"/{m} has " in str(e)]
            if not stale:
                raise
            log.warning("%s: unpinning %s and creating it anew", e, ", ".join(stale))
            d = loader.pin_dir(self.node)
            for m in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, m))
            self.progs = loader.CgroupPrograms(SOURCE, PROGRAMS, node=self.node)

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
        if self.progs is not None:
            self.progs.close()
            self.progs = None

    def _map(self, name: str) -> object:
        assert self.progs is not None, "load() first"
        return self.progs.map(name)

    # ------------------------------------------------------------ maps

    def read_kernel(self) -> dict[SvcKey, _Have]:
        """What the pinned maps program now (after a restart: the previous run's entries)."""
        svc, be = self._map("proxy_svc"), self._map("proxy_be")
        by_gen: dict[int, dict[int, tuple[str, int]]] = {}
        for k, v in _items(be):
            by_gen.setdefault(k.gen, {})[k.slot] = (_ip(v.ip), socket.ntohs(v.port))
        names = {n: p for p, n in PROTOCOLS.items()}
        have: dict[SvcKey, _Have] = {}
        top = 0
        for k, v in _items(svc):
            slots = by_gen.get(v.gen, {})
            backends = tuple(sorted(slots[i] for i in range(v.count) if i in slots))
            aff = v.timeout if v.flags & SVC_AFFINITY else None
            key = (_ip(k.vip), socket.ntohs(k.port), names.get(k.proto, str(k.proto)))
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
        svc, be, member = self._map("proxy_svc"), self._map("proxy_be"), self._map("proxy_member")
        be_items, member_items, svc_items, svc_gone, old = [], [], [], [], []
        for key, entry in want.items():
            had = self.have.get(key)
            if entry is None:
                if had is not None:
                    svc_gone.append(_svc_key(svc, key))
                    old.append(had)
                    del self.have[key]
                continue
            if had is not None and had.entry == entry:
                continue
            gen = self._gen()
            for slot, (ip, port) in enumerate(entry.backends):
                b = be.Leaf()
                b.ip, b.port = loader.ip_key(ip), socket.htons(port)
                be_items.append((be.Key(gen, slot), b))
                m = member.Key()
                m.gen, m.ip, m.port = gen, b.ip, b.port
                member_items.append((m, 1))
            v = svc.Leaf()
            v.gen, v.count = gen, len(entry.backends)
            v.flags = SVC_AFFINITY if entry.affinity is not None else 0
            v.timeout = entry.affinity or 0
            # affinity's epoch: kept while affinity stays on, new when it is switched on,
            # so clients remembered before it was off are not honoured again
            kept = had is not None and had.entry.affinity is not None and had.epoch
            v.epoch = (had.epoch if kept else gen) if entry.affinity is not None else 0
            svc_items.append((_svc_key(svc, key), v))
            if had is not None:
                old.append(had)
            self.have[key] = _Have(gen, entry, v.epoch)
        # new backends before the service points at them; the old ones after it moved on
        for table, items in ((be, be_items), (member, member_items), (svc, svc_items)):
            if items:
                loader.update_batch(table, items)
                self.batches += 1
        if svc_gone:
            loader.delete_batch(svc, svc_gone)
            self.batches += 1
        self._used.difference_update(h.gen for h in old)
        self._free(old, self._orphans)
        self._orphans = set()
        return len(be_items) + len(svc_items) + len(svc_gone)

    def _free(self, old: Iterable[_Have], gens: set[int]) -> None:
        be, member = self._map("proxy_be"), self._map("proxy_member")
        be_keys, member_keys = [], []
        for h in old:
            for slot, (ip, port) in enumerate(h.entry.backends):
                be_keys.append(be.Key(h.gen, slot))
                m = member.Key()
                m.gen, m.ip, m.port = h.gen, loader.ip_key(ip), socket.htons(port)
                member_keys.append(m)
        if gens:  # generations nobody points at (a crash between two batches)
            be_keys += [k for k, _ in _items(be) if k.gen in gens]
            member_keys += [k for k, _ in _items(member) if k.gen in gens]
        for table, keys in ((be, be_keys), (member, member_keys)):
            if keys:
                loader.delete_batch(table, keys)
                self.batches += 1

    def sync(self, views: Mapping[str, ServiceView], changed: Iterable[str] | None) -> int:
        """Program the changed services (None: every one, and remove ports nobody wants)."""
        if changed is None or self.have is None:
            self.read_kernel()
            assert self.have is not None
            want: dict[SvcKey, Entry | None] = dict.fromkeys(self.have)
            self._owner = {}
            for name, v in views.items():
                got = entries(v)
                want.update(got)
                self._owner.update(dict.fromkeys(got, name))
            return self.apply(want)
        keys = set(changed)
        # a changed service's ports that are gone (service deleted, VIP or port changed)
        want = {k: None for k, owner in self._owner.items() if owner in keys}
        for k in want:
            del self._owner[k]
        for name in keys:
            got = entries(views.get(name))
            want.update(got)
            self._owner.update(dict.fromkeys(got, name))
        return self.apply(want)

    def map_memory(self) -> dict[str, int]:
        """Kernel memory of each map (bytes, from its fd's `memlock`)."""
        out = {}
        for name in (*MAPS, pod_cgroups.MAP):
            fd = self._map(name).map_fd  # type: ignore[attr-defined]
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("memlock:"):
                        out[name] = int(line.split()[1])
        return out


def _svc_key(table: object, key: SvcKey) -> object:
    ip, port, proto = key
    k = table.Key()  # type: ignore[attr-defined]
    k.vip, k.port, k.proto = loader.ip_key(ip), socket.htons(port), PROTOCOLS[proto]
    return k


def _items(table: object) -> list[tuple[object, object]]:
    try:
        return list(table.items_lookup_batch())  # type: ignore[attr-defined]
    except Exception:  # no batch lookup for this map or kernel: walk it
        return list(table.items())  # type: ignore[attr-defined]


def remove_all(node: str, cgroup: str | None = None) -> list[str]:
    """Detach the programs from the node's cgroup and unpin the proxy's maps (--cleanup).

    pod_cgroups stays: it is the node runtime's (its entries describe running pods).
    """
    done = []
    cg = cgroup or node_cgroup(node)
    with contextlib.suppress(loader.CgroupError):
        for p in loader.detach_cgroup(cg, names=list(PROGRAMS)):
            done.append(f"eBPF program {p.name} ({p.hook}) from {cg}")
    with contextlib.suppress(ValueError):
        d = loader.pin_dir(node)
        for name in MAPS:
            path = os.path.join(d, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                done.append(f"pinned map {path}")
    return done


__all__ = ["Entry", "SockLB", "cgroup2_missing", "entries", "remove_all"]
