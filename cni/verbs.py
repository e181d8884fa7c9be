"""The CNI verbs: ADD, DEL, CHECK, GC, STATUS and VERSION of corral-cni and corral-ipam.

`Verbs.dispatch(request)` answers one parsed request with the node's IPAM (etcd)
and `Plumber` (netlink); one verb at a time per attachment (`attachment()`,
which the reaper takes too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import aetcd.exceptions

from corral.api.store import StoreError, pool_id
from corral.cni import errors as E
from corral.cni.bridge import Attachment, Plumber
from corral.cni.config import (
    SUPPORTED_VERSIONS,
    IPAMConfig,
    Range,
    Request,
    Route,
    parse_bridge,
    parse_ipam,
    version_tuple,
)
from corral.cni.errors import CNIError
from corral.cni.ipam import IPAM, Allocated
from corral.cni.sources import extra_source
from corral.cni.subnet import NodeSubnet
from corral.daemon.nodecontext import NodeContext

log = logging.getLogger("corral.cni.server")
DEFAULT_ROUTE = Route(ipaddress.IPv4Network("0.0.0.0/0"))


def convert_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """A 1.x result in the shape of `version` (0.3.x/0.4.0 tag each IP with version 4)."""
    out = dict(result, cniVersion=version)
    if version_tuple(version) < (1, 0, 0):
        out["ips"] = [dict(ip, version="4") for ip in result.get("ips", [])]
    return out


class Verbs:
    """What each CNI verb does, for one node."""

    def __init__(self, ctx: NodeContext, subnet: NodeSubnet, ipam: IPAM, plumber: Plumber) -> None:
        self.ctx = ctx
        self.subnet = subnet
        self.ipam = ipam
        self.plumber = plumber
        self.locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    async def dispatch(self, req: Request) -> dict[str, Any] | None:
        if req.command == "VERSION":
            return {"cniVersion": req.cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
        self.subnet.refresh()
        if req.command == "STATUS":
            await self._status(req)
            return None
        if req.command == "GC":
            await self._gc(req)
            return None
        # One verb at a time per attachment (a runtime's DEL racing its own ADD).
        async with self.attachment(req.container_id, req.ifname):
            if req.command == "ADD":
                result = await self._add(req)
                await self._address_hooks(req, result)
                return result
            if req.command == "DEL":
                await self._del(req)
                return None
            await self._check(req)
            return None

    @contextlib.asynccontextmanager
    async def attachment(self, container_id: str, ifname: str) -> AsyncIterator[None]:
        """Hold the attachment's lock: ADD, DEL, CHECK and the reaper take turns on it."""
        key = (container_id, ifname)
        lock, users = self.locks.get(key, (asyncio.Lock(), 0))
        self.locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self.locks[key]
            if users == 1:
                del self.locks[key]
            else:
                self.locks[key] = (lock, users - 1)

    def _ranges(self, ipc: IPAMConfig) -> list[list[Range]]:
        if ipc.range_sets:
            self._check_ranges(ipc.range_sets)
            return ipc.range_sets
        if self.subnet.range is None:
            raise CNIError(
                E.TRY_AGAIN_LATER,
                "this node has no subnet lease yet",
                f"waiting for {self.subnet.path} from the overlay",
            )
        return [[self.subnet.range]]

    def _check_ranges(self, sets: list[list[Range]]) -> None:
        """Explicit ranges stay inside the cluster network, clear of node addresses.

        Anything else would hand a pod an address the overlay does not route to it,
        or one of the underlay's (a node's own IP), which a pod must never hold.
        """
        network = self.subnet.network
        if network is None:
            raise CNIError(
                E.TRY_AGAIN_LATER,
                "this node has no subnet lease yet, so explicit ranges cannot be checked",
                f"waiting for {self.subnet.path} from the overlay",
            )
        node_ips = {ipaddress.IPv4Address(ip) for ip in (self.ctx.underlay_ip,) if ip}
        for i, rs in enumerate(sets):
            for j, r in enumerate(rs):
                where = f"ipam.ranges[{i}][{j}]"
                if not r.subnet.subnet_of(network):
                    raise CNIError(
                        E.INVALID_CONFIG,
                        f"{where}.subnet {r.subnet} is outside the cluster network {network}",
                        "pods get addresses from the cluster network only",
                    )
                if any(r.start <= ip <= r.end for ip in node_ips):
                    raise CNIError(
                        E.INVALID_CONFIG,
                        f"{where} includes this node's own address",
                        "pick a range clear of node and underlay addresses",
                    )

    @staticmethod
    def _prev_ips(req: Request) -> dict[str, ipaddress.IPv4Address]:
        """pool -> IP for the addresses in prevResult (what the runtime cached from ADD)."""
        out = {}
        for ip in (req.prev_result or {}).get("ips", []) or []:
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                iface = ipaddress.IPv4Interface(ip["address"])
                out[pool_id(str(iface.network))] = iface.ip
        return out

    def _pools(self, req: Request, ipc: IPAMConfig) -> list[str]:
        pools = [r.pool for s in ipc.range_sets for r in s]
        if not ipc.range_sets and self.subnet.range is not None:
            pools.append(self.subnet.range.pool)
        pools += list(self._prev_ips(req))
        return list(dict.fromkeys(pools))

    async def _status(self, req: Request) -> None:
        ipc = parse_ipam(req.conf, {}) if req.conf else IPAMConfig()
        if not ipc.range_sets and self.subnet.range is None:
            raise CNIError(
                E.PLUGIN_NOT_AVAILABLE,
                "this node has no subnet lease yet",
                f"waiting for {self.subnet.path} from the overlay",
            )
        try:
            await asyncio.wait_for(self.ctx.store.revision(), 2)
        except (StoreError, TimeoutError, OSError, aetcd.exceptions.ClientError) as e:
            raise CNIError(E.PLUGIN_NOT_AVAILABLE, "etcd is not answering", str(e)) from None

    def _routes(self, ipc: IPAMConfig) -> list[Route]:
        return ipc.routes if ipc.routes is not None else [DEFAULT_ROUTE]

    async def _allocate(
        self,
        req: Request,
        ipc: IPAMConfig,
        sets: list[list[Range]],
        picked: asyncio.Future[Allocated] | None = None,
    ) -> list[tuple[ipaddress.IPv4Address, Range]]:
        got: list[tuple[ipaddress.IPv4Address, Range]] = []
        try:
            for rs in sets:
                a = await self.ipam.allocate(
                    rs,
                    req.container_id,
                    req.ifname,
                    ipc.requested,
                    req.cni_args,
                    picked,
                    plugin=req.plugin,
                )
                got.append((a.ip, a.range))
        except BaseException:
            await self.ipam.release([r.pool for _, r in got], req.container_id, req.ifname)
            raise
        return got

    async def _address_hooks(self, req: Request, result: dict[str, Any]) -> None:
        """Tell the node's hooks (NodeContext.address_hooks) the pod's new address before
        ADD answers; a hook's failure undoes nothing here but fails the ADD."""
        hooks = getattr(self.ctx, "address_hooks", None)
        ns, name = req.cni_args.get("K8S_POD_NAMESPACE"), req.cni_args.get("K8S_POD_NAME")
        if not hooks or not ns or not name:
            return
        for entry in result.get("ips") or []:
            ip = str(entry.get("address", "")).split("/")[0]
            if not ip:
                continue
            for hook in hooks:
                try:
                    await hook(ns, name, ip)
                except Exception as e:
                    raise CNIError(
                        E.TRY_AGAIN_LATER,
                        f"the pod's network policy could not be put in place for {ip}",
                        str(e),
                    ) from None

    async def _add(self, req: Request) -> dict[str, Any]:
        ipc = parse_ipam(req.conf, req.cni_args)
        if req.plugin == "corral-ipam":
            got = await self._allocate(req, ipc, self._ranges(ipc))
            res = {
                "ips": [
                    {"address": f"{ip}/{r.subnet.prefixlen}", "gateway": str(r.gateway)}
                    for ip, r in got
                ],
                "routes": [rt.to_dict() for rt in self._routes(ipc)],
                "dns": req.conf.get("dns") or {},
            }
            return convert_result(res, req.cni_version)
        bc = parse_bridge(req.conf)
        sets = self._ranges(ipc)
        if len(sets) != 1:
            raise CNIError(
                E.UNSUPPORTED_FIELD,
                f"corral-cni takes one IPv4 range set in ipam.ranges, not {len(sets)}",
            )
        routes = self._routes(ipc)
        rng0 = sets[0][0]
        att = Attachment(
            req.container_id,
            req.ifname,
            req.netns,
            rng0.start,
            rng0.subnet,
            rng0.gateway,
            routes,
            bc.mtu or self.subnet.mtu,
            extra_source(req.cni_args, self.subnet.network),
        )
        # The kernel makes and configures the pair with the free IP the allocator
        # picked while etcd commits it; only a committed IP is ever returned.
        picked: asyncio.Future[Allocated] = asyncio.get_running_loop().create_future()
        alloc = asyncio.ensure_future(self._allocate(req, ipc, sets, picked))
        try:
            await asyncio.wait((picked, alloc), return_when=asyncio.FIRST_COMPLETED)
            if picked.done():
                guess = picked.result()
                att.address, att.subnet, att.gateway = (
                    guess.ip,
                    guess.range.subnet,
                    guess.range.gateway,
                )
            else:  # a requested IP: granted (or refused) before anything is made
                [(ip, rng)] = await alloc
                att.address, att.subnet, att.gateway = ip, rng.subnet, rng.gateway
            res = await self.plumber.attach(bc, att, self.subnet.network)
        except BaseException:
            got = await asyncio.gather(alloc, return_exceptions=True)
            if not isinstance(got[0], BaseException):
                await self.ipam.release([r.pool for _, r in got[0]], req.container_id, req.ifname)
            raise
        try:
            [(ip, rng)] = await alloc
        except BaseException:
            await self.plumber.undo(req.container_id, req.ifname)
            raise
        if (ip, rng.subnet, rng.gateway) != (att.address, att.subnet, att.gateway):
            # Rare: etcd granted another IP (the attachment already held one, or a
            # concurrent allocator won the pick). Redo the pair with the granted one.
            att.address, att.subnet, att.gateway = ip, rng.subnet, rng.gateway
            try:
                await self.plumber.undo(req.container_id, req.ifname)
                res = await self.plumber.attach(bc, att, self.subnet.network)
            except BaseException:
                await self.ipam.release([rng.pool], req.container_id, req.ifname)
                raise
        prev = req.prev_result or {}
        ifaces = list(prev.get("interfaces") or [])
        base = len(ifaces)
        res["interfaces"] = ifaces + res["interfaces"]
        mine = {
            "address": f"{ip}/{rng.subnet.prefixlen}",
            "gateway": str(rng.gateway),
            "interface": base + 2,
        }
        res["ips"] = [*(prev.get("ips") or []), mine]
        res["routes"] = list(prev.get("routes") or []) + [
            {"dst": str(r.dst), "gw": str(r.gw or rng.gateway)} for r in routes
        ]
        res["dns"] = req.conf.get("dns") or prev.get("dns") or {}
        return convert_result(res, req.cni_version)

    async def _del(self, req: Request) -> None:
        ipc = parse_ipam(req.conf, {})
        pools = self._pools(req, ipc) or await self.ipam.pools_of(req.container_id, req.ifname)
        release = self.ipam.release(pools, req.container_id, req.ifname, self._prev_ips(req))
        if req.plugin == "corral-cni":
            bc = parse_bridge(req.conf)
            await asyncio.gather(self.plumber.delete(req.container_id, req.ifname), release)
            own = self.subnet.range.subnet if self.subnet.range is not None else None
            if bc.is_gateway:
                for r in {r.subnet: r for rs in ipc.range_sets for r in rs}.values():
                    if r.subnet != own:
                        await self.plumber.release_gateway(bc.bridge, r.gateway, r.subnet)
        else:
            await release

    async def _check(self, req: Request) -> None:
        ipc = parse_ipam(req.conf, req.cni_args)
        prev = req.prev_result
        if prev is None:
            raise CNIError(E.INVALID_CONFIG, "CHECK needs prevResult in the configuration")
        ips = prev.get("ips") or []
        ifaces = prev.get("interfaces") or []
        mine = [
            ip
            for ip in ips
            if isinstance(ip.get("interface"), int)
            and 0 <= ip["interface"] < len(ifaces)
            and ifaces[ip["interface"]].get("name") == req.ifname
            and ifaces[ip["interface"]].get("sandbox")
        ]
        if req.plugin == "corral-ipam":
            mine = ips
        if not mine:
            raise CNIError(E.CHECK_FAILED, f"prevResult has no address for {req.ifname}")
        addr = ipaddress.IPv4Interface(mine[0]["address"])
        held = await self.ipam.lookup(pool_id(str(addr.network)), req.container_id, req.ifname)
        if held != addr.ip:
            raise CNIError(
                E.CHECK_FAILED,
                f"{req.container_id}/{req.ifname} does not hold "
                f"{addr.ip} in the IPAM store (holds {held or 'nothing'})",
            )
        if req.plugin == "corral-ipam":
            return
        bc = parse_bridge(req.conf)
        gw = ipaddress.IPv4Address(mine[0].get("gateway") or addr.network[1])
        att = Attachment(
            req.container_id, req.ifname, req.netns, addr.ip, addr.network, gw, self._routes(ipc), 0
        )
        await self.plumber.check(bc, att)

    async def _gc(self, req: Request) -> None:
        valid = req.valid_attachments()
        ipc = parse_ipam(req.conf, {})
        freed = await self.ipam.gc(self._pools(req, ipc), valid)
        gone: list[str] = []
        if req.plugin == "corral-cni":
            bc = parse_bridge(req.conf)
            gone = await self.plumber.gc(bc.bridge, valid)
        if freed or gone:
            log.info("GC released %d IPs and %d veths", len(freed), len(gone))
