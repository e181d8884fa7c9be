"""Subnet leases: one /subnetLen per node, claimed in etcd and kept alive by an etcd lease.

A lease record lives at `subnet_key(subnet)`, attached to an etcd lease with a
TTL (30 s by default, renewed every TTL/3), so the subnet frees itself when a
node disappears. Claiming is a create-if-absent transaction, so two nodes can
never hold one subnet. A node gets its old subnet back when it can, in this
order: a record already naming this node, or holding the subnet persisted in
its state dir under its public IP (either taken over with a compare-and-swap
onto the new etcd lease); the persisted subnet if free; the lowest free one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

from pydantic import ValidationError

from corral.api.netconfig import leasable_subnets
from corral.api.objects import NetworkSpec, SubnetLease
from corral.api.store import (
    KV,
    SUBNETS_PREFIX,
    AlreadyExists,
    Conflict,
    Store,
    now_iso,
    subnet_key,
)

log = logging.getLogger(__name__)

DEFAULT_TTL = 30


class NoFreeSubnet(RuntimeError):
    pass


@dataclass
class Lease:
    subnet: str
    lease_id: int
    record: SubnetLease

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)


def decode(value: bytes | None) -> SubnetLease | None:
    if not value:
        return None
    try:
        return SubnetLease.model_validate_json(value)
    except ValidationError:
        return None


def encode(record: SubnetLease) -> bytes:
    return record.model_dump_json(by_alias=True, exclude_none=True).encode()


class SubnetLeaser:
    """Acquires and renews this node's subnet lease."""

    def __init__(
        self,
        store: Store,
        node_name: str,
        public_ip: str,
        vtep_mac: str,
        spec: NetworkSpec,
        ttl: int = DEFAULT_TTL,
    ) -> None:
        self.store = store
        self.node_name = node_name
        self.public_ip = public_ip
        self.vtep_mac = vtep_mac
        self.spec = spec
        self.ttl = ttl

    def _record(self, subnet: str) -> SubnetLease:
        return SubnetLease(
            subnet=subnet,
            node_name=self.node_name,
            public_ip=self.public_ip,
            vtep_mac=self.vtep_mac,
            renewed_at=now_iso(),
        )

    def _in_plan(self, subnet: str) -> bool:
        net = ipaddress.ip_network(subnet)
        return net.prefixlen == self.spec.subnet_len and net.subnet_of(
            ipaddress.ip_network(self.spec.network)
        )  # type: ignore[arg-type]

    async def try_acquire(self, preferred: str | None = None) -> Lease:
        """One attempt; NoFreeSubnet when the network is full, store errors pass through."""
        kvs, _ = await self.store.list_raw(SUBNETS_PREFIX)
        held: dict[str, tuple[KV, SubnetLease | None]] = {}
        for kv in kvs:
            rec = decode(kv.value)
            held[kv.key] = (kv, rec)
        lease_id = await self.store.grant_lease(self.ttl)
        try:
            # Ours: named after this node, or the subnet this machine had (its state dir
            # says so) under its public IP. A public IP alone is not enough: two nodes
            # behind one NAT address would take each other's leases in turn.
            mine = [
                (kv, rec)
                for kv, rec in held.values()
                if rec is not None
                and self._in_plan(rec.subnet)
                and (
                    rec.node_name == self.node_name
                    or (rec.public_ip == self.public_ip and rec.subnet == preferred)
                )
            ]
            mine.sort(key=lambda p: (p[1].subnet != preferred, p[1].node_name != self.node_name))
            for kv, rec in mine:
                try:
                    await self.store.cas_raw(
                        kv.key, encode(self._record(rec.subnet)), kv.mod_revision, lease=lease_id
                    )
                except Conflict:
                    continue
                if kv.lease and kv.lease != lease_id:
                    await self.store.revoke_lease(kv.lease)  # drops nothing else: one key
                return Lease(rec.subnet, lease_id, self._record(rec.subnet))
            candidates: list[str] = []
            if preferred and self._in_plan(preferred) and subnet_key(preferred) not in held:
                candidates.append(preferred)
            for net in leasable_subnets(self.spec):
                s = str(net)
                if subnet_key(s) not in held and s != preferred:
                    candidates.append(s)
                    break
            for s in candidates:
                try:
                    await self.store.create_raw(
                        subnet_key(s), encode(self._record(s)), lease=lease_id
                    )
                except AlreadyExists:
                    continue
                return Lease(s, lease_id, self._record(s))
            if candidates:
                # Lost every race this round; the caller retries with a fresh list.
                raise Conflict("every candidate subnet was claimed concurrently")
            raise NoFreeSubnet(f"no free /{self.spec.subnet_len} left in {self.spec.network}")
        except BaseException:
            await self.store.revoke_lease(lease_id)
            raise

    async def acquire(self, preferred: str | None = None, max_backoff: float = 10.0) -> Lease:
        """Retry until a subnet is held; never gives up (a node without one strands pods)."""
        backoff = 0.2
        while True:
            try:
                return await self.try_acquire(preferred)
            except Conflict:
                backoff = 0.05
            except NoFreeSubnet as e:
                log.error(
                    "subnet lease: %s; retrying (remove dead nodes with "
                    "`corral node remove NAME` to free theirs)",
                    e,
                )
            except Exception as e:  # etcd away: keep trying
                log.warning(
                    "subnet lease: cannot reach etcd (%s: %s); retrying in %.1fs",
                    type(e).__name__,
                    e,
                    backoff,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)

    async def renew(self, lease: Lease) -> bool:
        """Keep `lease` alive; False if it is gone (expired, or its key deleted or taken)."""
        ttl = await self.store.refresh_lease(lease.lease_id)
        if ttl <= 0:
            return False
        kv = await self.store.get_raw(lease.key)
        if kv is None or kv.lease != lease.lease_id:
            return False
        rec = decode(kv.value)
        return rec is not None and rec.node_name == self.node_name

    async def release(self, lease: Lease) -> None:
        """Give the subnet up now (operator removal); normal shutdown just lets it be."""
        await self.store.revoke_lease(lease.lease_id)


async def remove_node_leases(store: Store, node_name: str) -> list[str]:
    """Delete every subnet lease `node_name` holds (and its etcd lease); the freed subnets."""
    kvs, _ = await store.list_raw(SUBNETS_PREFIX)
    freed = []
    for kv in kvs:
        rec = decode(kv.value)
        if rec is None or rec.node_name != node_name:
            continue
        try:
            if await store.delete_raw(kv.key, kv.mod_revision):
                freed.append(rec.subnet)
        except Conflict:
            continue  # renewed or re-taken meanwhile; the caller can run again
        if kv.lease:
            await store.revoke_lease(kv.lease)
    return freed
