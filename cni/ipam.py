"""etcd IPAM: one key per IP, created together with its owner index in one transaction.

    /corral/v1/ipam/<pool>/ips/<ip>                      IPAllocation JSON
    /corral/v1/ipam/<pool>/owners/<containerID>/<ifname> the IP (text)

Both keys are created in one create-if-absent transaction and deleted in one
transaction, so an IP is never held without an owner nor handed out twice, on one
node or across nodes. The daemon keeps, per pool, the IPs it knows are taken and a
round-robin cursor: concurrent ADDs each try a different IP instead of racing for
the first free one, and a released IP is not reused at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from corral.api.objects import IPAllocation
from corral.api.store import PREFIX, Store, ipam_ip_key, ipam_owner_key, now_iso
from corral.cni import errors as E
from corral.cni.config import Addr4, Range
from corral.cni.errors import CNIError

log = logging.getLogger(__name__)


def pool_prefix(pool: str) -> str:
    return f"{PREFIX}/ipam/{pool}/"


@dataclass
class Allocated:
    ip: Addr4
    range: Range


class _PoolState:
    def __init__(self) -> None:
        self.used: set[Addr4] = set()
        self.loaded = False
        self.cursor = 0
        self.lock = asyncio.Lock()


class IPAM:
    """Allocation and release of IPs for (containerID, ifname) attachments."""

    def __init__(self, store: Store, node_name: str | None = None) -> None:
        self.store = store
        self.node_name = node_name
        self._pools: dict[str, _PoolState] = {}

    def _state(self, pool: str) -> _PoolState:
        return self._pools.setdefault(pool, _PoolState())

    async def _load(self, pool: str, st: _PoolState) -> None:
        kvs, _ = await self.store.list_raw(pool_prefix(pool) + "ips/")
        st.used = {ipaddress.IPv4Address(kv.key.rsplit("/", 1)[1]) for kv in kvs}
        st.loaded = True

    async def preload(self, pool: str) -> None:
        """Read a pool's allocations now (not at the first ADD), e.g. for its usage metrics."""
        st = self._state(pool)
        if not st.loaded:
            async with st.lock:
                if not st.loaded:
                    await self._load(pool, st)

    def usage(self) -> dict[str, int]:
        """pool -> addresses allocated, for the pools this daemon has read."""
        # Keys joined with "|" are range sets' combined views, not pools.
        return {p: len(st.used) for p, st in self._pools.items() if st.loaded and "|" not in p}

    @staticmethod
    def _candidates(ranges: list[Range], start: int) -> Iterator[tuple[int, Range, Addr4]]:
        """Every usable IP of the range set once, beginning at index `start`."""
        total = sum(r.size() for r in ranges)
        for k in range(total):
            i = (start + k) % total
            for r in ranges:
                if i < r.size():
                    ip = r.start + i
                    if r.usable(ip):
                        yield (start + k + 1) % total, r, ip
                    break
                i -= r.size()

    async def lookup(self, pool: str, container_id: str, ifname: str) -> Addr4 | None:
        kv = await self.store.get_raw(ipam_owner_key(pool, container_id, ifname))
        return None if kv is None else ipaddress.IPv4Address(kv.value.decode())

    async def _try(
        self,
        r: Range,
        ip: Addr4,
        container_id: str,
        ifname: str,
        meta: dict[str, str],
        plugin: str | None = None,
    ) -> tuple[bool, Addr4 | None]:
        """One create-if-absent txn; (True, ip) won, (False, existing) if already owned."""
        rec = IPAllocation(
            ip=str(ip),
            pool=r.pool,
            containerID=container_id,
            ifname=ifname,
            node_name=self.node_name,
            created_at=now_iso(),
            pod_namespace=meta.get("K8S_POD_NAMESPACE"),
            pod_name=meta.get("K8S_POD_NAME"),
            plugin=plugin,
        )
        ipk, ownk = ipam_ip_key(r.pool, str(ip)), ipam_owner_key(r.pool, container_id, ifname)
        ok, _ = await self.store.txn(
            compare=[("create", ipk, "==", 0), ("create", ownk, "==", 0)],
            success=[
                ("put", ipk, json.dumps(rec.dump()).encode()),
                ("put", ownk, str(ip).encode()),
            ],
        )
        if ok:
            return True, ip
        return False, await self.lookup(r.pool, container_id, ifname)

    async def allocate(
        self,
        ranges: list[Range],
        container_id: str,
        ifname: str,
        requested: list[Addr4],
        meta: dict[str, str],
        picked: asyncio.Future[Allocated] | None = None,
        plugin: str | None = None,
    ) -> Allocated:
        """One IP from this range set for the attachment (its existing one if it has one).

        `picked` learns the first free candidate (by this daemon's view of the pool)
        before its transaction is sent, so the caller can configure it while etcd
        commits; only the return value is granted. A requested IP is not offered: it
        may well belong to someone else.
        """

        def pick(ip: Addr4, r: Range) -> None:
            if picked is not None and not picked.done():
                picked.set_result(Allocated(ip, r))

        want = [ip for ip in requested if any(ip in r.subnet for r in ranges)]
        if requested and not want:
            raise CNIError(
                E.IP_UNAVAILABLE,
                "requested IP "
                + ", ".join(map(str, requested))
                + " is outside the range "
                + ", ".join(f"{r.start}-{r.end}" for r in ranges),
            )
        if want:
            ip = want[0]
            r = next((r for r in ranges if r.usable(ip)), None)
            if r is None:
                raise CNIError(
                    E.IP_UNAVAILABLE,
                    f"requested IP {ip} is not assignable",
                    "it is the network, broadcast or gateway address, or outside "
                    "rangeStart..rangeEnd",
                )
            won, existing = await self._try(r, ip, container_id, ifname, meta, plugin)
            if won or existing == ip:
                self._state(r.pool).used.add(ip)
                return Allocated(ip, r)
            if existing is not None:
                raise CNIError(
                    E.IP_UNAVAILABLE,
                    f"{container_id}/{ifname} already holds {existing}, not the requested {ip}",
                    "DEL it first",
                )
            raise CNIError(E.IP_UNAVAILABLE, f"requested IP {ip} is already in use")
        key = "|".join(r.pool for r in ranges)
        st = self._state(key)
        for attempt in range(2):
            async with st.lock:
                if not st.loaded or attempt:
                    st.used = set()
                    for pool in {r.pool for r in ranges}:
                        ps = self._state(pool)
                        await self._load(pool, ps)
                        st.used |= ps.used
                    st.loaded = True
            for nxt, r, ip in self._candidates(ranges, st.cursor):
                if ip in st.used:
                    continue
                st.used.add(ip)  # claimed before the await: concurrent ADDs skip it
                st.cursor = nxt
                pick(ip, r)
                won, existing = await self._try(r, ip, container_id, ifname, meta, plugin)
                if won:
                    return Allocated(ip, r)
                if existing is not None:  # a concurrent ADD for the same attachment won
                    st.used.discard(ip)
                    return Allocated(existing, next(x for x in ranges if existing in x.subnet))
        raise CNIError(
            E.RANGE_EXHAUSTED,
            "no free IP left in " + ", ".join(f"{r.start}-{r.end}" for r in ranges),
        )

    def _forget(self, ip: Addr4) -> None:
        for st in self._pools.values():
            st.used.discard(ip)

    async def _release_owner(self, pool: str, container_id: str, ifname: str) -> Addr4 | None:
        ownk = ipam_owner_key(pool, container_id, ifname)
        for _ in range(5):
            kv = await self.store.get_raw(ownk)
            if kv is None:
                return None
            ip = kv.value.decode()
            ok, _ = await self.store.txn(
                compare=[("mod", ownk, "==", kv.mod_revision)],
                success=[("delete", ownk), ("delete", ipam_ip_key(pool, ip))],
            )
            if ok:
                addr = ipaddress.IPv4Address(ip)
                self._forget(addr)
                return addr
        raise CNIError(E.TRY_AGAIN_LATER, f"owner record {ownk} keeps changing")

    async def release(
        self,
        pools: list[str],
        container_id: str,
        ifname: str,
        hints: dict[str, Addr4] | None = None,
    ) -> list[Addr4]:
        """Release what the attachment holds in these pools; nothing held is fine.

        `hints` (pool -> IP, from the cached prevResult a runtime passes to DEL) make
        the common case one transaction instead of a read and a transaction.
        """
        out = []
        for pool in dict.fromkeys(pools):
            hint = (hints or {}).get(pool)
            if hint is not None:
                ownk = ipam_owner_key(pool, container_id, ifname)
                ok, _ = await self.store.txn(
                    compare=[("value", ownk, "==", str(hint))],
                    success=[("delete", ownk), ("delete", ipam_ip_key(pool, str(hint)))],
                )
                if ok:
                    self._forget(hint)
                    out.append(hint)
                    continue
            ip = await self._release_owner(pool, container_id, ifname)
            if ip is not None:
                out.append(ip)
        return out

    async def pools_of(self, container_id: str, ifname: str) -> list[str]:
        """Every pool where the attachment holds an IP: a full scan, for the rare DEL that
        names no pool (no prevResult, no ranges and no node subnet)."""
        kvs, _ = await self.store.list_raw(f"{PREFIX}/ipam/")
        tail = f"/owners/{container_id}/{ifname}"
        return [
            kv.key[len(f"{PREFIX}/ipam/") : -len(tail)].split("/")[0]
            for kv in kvs
            if kv.key.endswith(tail)
        ]

    async def owners(self, pool: str) -> dict[tuple[str, str], Addr4]:
        kvs, _ = await self.store.list_raw(pool_prefix(pool) + "owners/")
        out = {}
        for kv in kvs:
            cid, _, ifname = kv.key[len(pool_prefix(pool) + "owners/") :].partition("/")
            out[(cid, ifname)] = ipaddress.IPv4Address(kv.value.decode())
        return out

    async def gc(self, pools: list[str], valid: set[tuple[str, str]]) -> list[Addr4]:
        """Release every allocation in these pools whose attachment is not in `valid`."""
        freed = []
        for pool in dict.fromkeys(pools):
            for cid, ifname in await self.owners(pool):
                if (cid, ifname) not in valid:
                    ip = await self._release_owner(pool, cid, ifname)
                    if ip is not None:
                        freed.append(ip)
            # IP keys without an owner cannot be made by this module; tidy any anyway.
            owned = {str(ip) for ip in (await self.owners(pool)).values()}
            kvs, _ = await self.store.list_raw(pool_prefix(pool) + "ips/")
            for kv in kvs:
                ip = kv.key.rsplit("/", 1)[1]
                if ip not in owned:
                    ok, _ = await self.store.txn(
                        compare=[("mod", kv.key, "==", kv.mod_revision)],
                        success=[("delete", kv.key)],
                    )
                    if ok:
                        log.warning("gc: removed IP %s of pool %s that had no owner", ip, pool)
                        freed.append(ipaddress.IPv4Address(ip))
                        self._forget(ipaddress.IPv4Address(ip))
        return freed
