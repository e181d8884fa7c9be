"""Bridge + veth plumbing over netlink, on dedicated threads.

One "ops" thread owns netlink sockets in the node's namespace and makes every
change in order. An ADD creates the pair from the node side in one request (host
end up, on the bridge, pod end created straight in the pod, both with MTU and a
MAC we chose, so nothing is read back; hairpin rides in the same batch); the pod
end is configured on the same thread through a socket opened in the pod's
namespace (setns), in two batches: look up + up, then address, lo up and routes.
These hot-path messages go through `corral.node.netlink.Socket` (a few
struct-packed requests, ~1 ms of Python less per request than pyroute2); the
rest stays on pyroute2 (`netlink.iproute`).
Deleting a veth takes the kernel ~17 ms (RCU), so DEL takes the pair down
synchronously and a second "reaper" thread deletes it by ifindex afterwards; an
ADD for the same attachment waits for that first.

Host ends are named `veth<sha256(containerID/ifname)[:11]>`: DEL finds them again
without any cache, and GC tells ours (that pattern) from anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from corral.cni import errors as E
from corral.cni.config import Addr4, BridgeConfig, Net4, Route
from corral.cni.errors import CNIError
from corral.node import iptables, netlink, netns, podguard, sysctl
from corral.node.netlink import random_mac
from corral.node.podveth import parse_pod_alias, pod_alias

log = logging.getLogger(__name__)
HOST_NAME_RE = re.compile(r"^veth[0-9a-f]{11}$")


def host_veth_name(container_id: str, ifname: str) -> str:
    return "veth" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


@dataclass
class Attachment:
    """What ADD asks for: one interface in a pod namespace on the node bridge."""

    container_id: str
    ifname: str
    netns: str
    address: Addr4
    subnet: Net4
    gateway: Addr4
    routes: list[Route]
    mtu: int
    extra_source: str | None = None  # the opt-in extra source prefix (corral.cni.sources)


class Plumber:
    """Kernel side of corral-cni; every public coroutine runs its work on a thread."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ops = ThreadPoolExecutor(
            1, thread_name_prefix="cni-netlink", initializer=self._init_thread
        )
        self._reaper = ThreadPoolExecutor(
            1, thread_name_prefix="cni-reaper", initializer=self._init_thread
        )
        self._local = threading.local()
        self._bridges: dict[tuple[str, str, int], tuple[int, str]] = {}
        self._masq: set[tuple[str, str]] = set()
        self._pending: dict[tuple[str, str], asyncio.Future[None]] = {}

    def _init_thread(self) -> None:
        netns.enter_thread(self.netns)  # a daemon outside its node's namespace (tests)
        self._local.ipr = netlink.iproute()
        self._local.nl = netlink.Socket()
        self._local.nsfd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)

    @property
    def ipr(self) -> Any:
        return self._local.ipr

    @property
    def nl(self) -> netlink.Socket:
        return self._local.nl

    async def _run(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def close(self) -> None:
        for pool in (self._ops, self._reaper):
            pool.shutdown(wait=True, cancel_futures=False)

    # ------------------------------------------------------------ bridge

    def _ensure_bridge(
        self, bc: BridgeConfig, gw: Addr4, subnet: Net4, mtu: int
    ) -> tuple[int, str]:
        """The bridge's (index, MAC); created and given the gateway address if need be."""
        ipr = self.ipr
        key = (bc.bridge, str(gw) if bc.is_gateway else "", subnet.prefixlen)
        known = self._bridges.get(key)
        if known is not None:
            return known
        try:
            link = ipr.link("get", ifname=bc.bridge)[0]
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            link = None
        if link is None:
            # A fixed MAC: a bridge otherwise takes the lowest MAC of its ports.
            with contextlib.suppress(NetlinkError):
                ipr.link("add", ifname=bc.bridge, kind="bridge", mtu=mtu, address=random_mac())
            link = ipr.link("get", ifname=bc.bridge)[0]
        idx = link["index"]
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind != "bridge":
            raise CNIError(E.INVALID_CONFIG, f"{bc.bridge} exists and is a {kind}, not a bridge")
        if bc.is_gateway:
            sysctl.ensure("net.ipv4.ip_forward", "1")  # as the reference's isGateway does
            have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
            if (str(gw), subnet.prefixlen) not in have:
                with contextlib.suppress(NetlinkError):
                    ipr.addr("add", index=idx, address=str(gw), prefixlen=subnet.prefixlen)
        ipr.link("set", index=idx, state="up")
        self._bridges[key] = (idx, str(link.get("address")))
        return self._bridges[key]

    async def release_gateway(self, bridge: str, gw: Addr4, subnet: Net4) -> bool:
        """Take `gw` off the bridge once no pod on it has an address in `subnet`.

        An explicit range's gateway is added by the first ADD in it; the DEL of its
        last pod removes it, so a DEL leaves no address it added. True if removed.
        """
        return await self._run(self._ops, self._release_gateway, bridge, gw, subnet)

    def _release_gateway(self, bridge: str, gw: Addr4, subnet: Net4) -> bool:
        ipr = self.ipr
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return False
        idx = found[0]
        for link in ipr.get_links():
            if link.get_attr("IFLA_MASTER") != idx or link.get_attr("IFLA_OPERSTATE") == "DOWN":
                continue
            tag = parse_pod_alias(link.get_attr("IFLA_IFALIAS"))
            if tag is not None and Addr4(tag[0]) in subnet:
                return False  # another pod still routes through this gateway
        try:
            ipr.addr("del", index=idx, address=str(gw), prefixlen=subnet.prefixlen)
        except NetlinkError as e:
            if e.code == errno.EADDRNOTAVAIL:
                return False
            raise
        for key in [k for k in self._bridges if k[0] == bridge and k[1] == str(gw)]:
            del self._bridges[key]
        return True

    def _ensure_masq(self, subnet: Net4, cluster: Net4 | None) -> None:
        """One MASQUERADE rule per pod subnet for traffic leaving the cluster network."""
        dst = str(cluster or subnet)
        if (str(subnet), dst) in self._masq:
            return
        rule = [
            "POSTROUTING",
            "-s",
            str(subnet),
            "!",
            "-d",
            dst,
            "-m",
            "comment",
            "--comment",
            "corral-cni ipMasq",
            "-j",
            "MASQUERADE",
        ]

        if not iptables.has_rule(self.netns, "nat", "POSTROUTING", rule):
            r = iptables.run(self.netns, ["iptables", "-t", "nat", "-A", *rule], check=False)
            if r.returncode != 0:
                raise CNIError(E.INTERNAL, "cannot add the ipMasq rule", r.stderr.strip())
        self._masq.add((str(subnet), dst))

    # ------------------------------------------------------------ ADD
    #
    # attach() makes the pair (host end up on the bridge, pod end created straight in
    # the pod) and configures the pod end (up, address, routes) in one thread hop.
    # The caller runs it with the IP the allocator picked while etcd is still
    # committing that IP; undo() removes the pair if the commit then fails.

    async def attach(
        self, bc: BridgeConfig, att: Attachment, cluster: Net4 | None
    ) -> dict[str, Any]:
        await self._reaped(att.container_id, att.ifname)
        try:
            return await self._run(self._ops, self._attach, bc, att, cluster)
        except CNIError as e:
            if e.code != E.INTERFACE_EXISTS or not self._pending:
                raise
        # The pod end may belong to a pair DEL handed to the reaper: wait, then retry.
        await self.drain()
        return await self._run(self._ops, self._attach, bc, att, cluster)

    def _attach(self, bc: BridgeConfig, att: Attachment, cluster: Net4 | None) -> dict[str, Any]:
        res = self._prepare(bc, att, cluster)
        self._configure(att)
        return res

    async def undo(self, container_id: str, ifname: str) -> None:
        await self._run(self._ops, self._delete_leftover, host_veth_name(container_id, ifname))

    def _delete_leftover(self, name: str) -> bool:
        try:
            self.nl.call([netlink.del_link(name=name)])
            return True
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return False

    def _prepare(self, bc: BridgeConfig, att: Attachment, cluster: Net4 | None) -> dict[str, Any]:
        br, br_mac = self._ensure_bridge(bc, att.gateway, att.subnet, att.mtu)
        if bc.ip_masq:
            self._ensure_masq(att.subnet, cluster)
        host = host_veth_name(att.container_id, att.ifname)
        host_mac, pod_mac = random_mac(), random_mac()
        try:
            fd = os.open(att.netns, os.O_RDONLY)
        except OSError as e:
            raise CNIError(E.INVALID_ENV, f"cannot open CNI_NETNS {att.netns}", str(e)) from None
        try:
            for attempt in range(2):
                try:
                    # The alias tells the node's eBPF fast path which pod is behind the veth.
                    reqs = [
                        netlink.veth(host, att.mtu, host_mac, br, att.ifname, fd, pod_mac),
                        netlink.set_alias(
                            host, pod_alias(str(att.address), pod_mac, att.extra_source)
                        ),
                    ]
                    if bc.hairpin:
                        reqs.append(netlink.hairpin(host))
                    created, *port = self.nl.batch(reqs)
                    if isinstance(created, NetlinkError):
                        raise created
                    break
                except NetlinkError as e:
                    if e.code in (errno.ENODEV, errno.EINVAL) and attempt == 0:
                        # The cached bridge went away (someone deleted it): make it again.
                        self._bridges = {
                            k: v for k, v in self._bridges.items() if k[0] != bc.bridge
                        }
                        br, br_mac = self._ensure_bridge(bc, att.gateway, att.subnet, att.mtu)
                        continue
                    if e.code != errno.EEXIST:
                        raise CNIError(E.INTERNAL, f"cannot create veth {host}", str(e)) from None
                    # Ours from a crashed or repeated ADD of this attachment: replace it.
                    if attempt == 0 and self._delete_leftover(host):
                        continue
                    raise CNIError(
                        E.INTERFACE_EXISTS,
                        f"interface {att.ifname} already exists in {att.netns}",
                        "pick another CNI_IFNAME or delete it first",
                    ) from None
        finally:
            os.close(fd)
        for res, what in zip(port, ("an alias", "hairpin mode"), strict=False):
            if isinstance(res, NetlinkError):
                self._delete_leftover(host)
                raise CNIError(E.INTERNAL, f"cannot set {what} on {host}", str(res)) from None
        # before the pod can send anything: only from its own address (the agent re-checks)
        src = podguard.PodSource(host, str(att.address), pod_mac, att.extra_source)
        try:
            podguard.add(self.netns, src)
        except (podguard.GuardError, OSError) as e:
            self._delete_leftover(host)
            raise CNIError(E.INTERNAL, f"cannot guard {host}'s source address", str(e)) from None
        return {
            "interfaces": [
                {"name": bc.bridge, "mac": br_mac},
                {"name": host, "mac": host_mac},
                {"name": att.ifname, "mac": pod_mac, "sandbox": att.netns},
            ],
        }

    def _configure(self, att: Attachment) -> None:
        try:
            with netlink.Socket(att.netns) as c:
                # EEXIST on a route: another attachment of this pod already has it.
                link, _ = c.call([netlink.get_link(att.ifname), netlink.link_up(att.ifname)])
                idx = netlink.ifindex(link)
                c.call(
                    [
                        netlink.add_address(
                            idx, ipaddress.IPv4Interface(f"{att.address}/{att.subnet.prefixlen}")
                        ),
                        netlink.link_up("lo", ignore=(errno.ENODEV,)),
                        *(
                            netlink.add_route(
                                r.dst, r.gw or att.gateway, idx, ignore=(errno.EEXIST,)
                            )
                            for r in att.routes
                        ),
                    ]
                )
        except (NetlinkError, ValueError, OSError) as e:
            self._delete_leftover(host_veth_name(att.container_id, att.ifname))
            raise CNIError(
                E.INTERNAL, f"cannot configure {att.ifname} in {att.netns}", str(e)
            ) from None

    # ------------------------------------------------------------ DEL

    async def delete(self, container_id: str, ifname: str) -> None:
        """Take the pair down now; delete it on the reaper thread."""
        await self._reaped(container_id, ifname)
        idx = await self._run(self._ops, self._down, host_veth_name(container_id, ifname))
        if idx is not None:
            key = (container_id, ifname)
            host = host_veth_name(container_id, ifname)
            fut = asyncio.get_running_loop().run_in_executor(self._reaper, self._reap, idx, host)
            self._pending[key] = fut
            fut.add_done_callback(
                lambda f: self._pending.pop(key, None) if self._pending.get(key) is f else None
            )

    async def _reaped(self, container_id: str, ifname: str) -> None:
        """Wait until a background delete of this attachment's pair has finished."""
        fut = self._pending.get((container_id, ifname))
        if fut is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)

    async def drain(self) -> None:
        """Wait for every background delete (shutdown, tests)."""
        for fut in list(self._pending.values()):
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)

    def _down(self, name: str) -> int | None:
        try:
            link, _ = self.nl.call([netlink.get_link(name), netlink.link_down(name)])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return None
        return netlink.ifindex(link)

    def _reap(self, idx: int, host: str = "") -> None:
        try:
            self.nl.call([netlink.del_link(idx)])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                log.warning("deleting veth index %d: %s", idx, e)
        if host:  # its guard chain too (the overlay agent's pass would, if it runs here)
            podguard.forget(self.netns, host)

    # ------------------------------------------------------------ CHECK

    async def check(self, bc: BridgeConfig, att: Attachment) -> None:
        await self._run(self._ops, self._check, bc, att)

    def _check(self, bc: BridgeConfig, att: Attachment) -> None:
        def fail(msg: str) -> CNIError:
            return CNIError(E.CHECK_FAILED, msg)

        ipr = self.ipr
        br = ipr.link_lookup(ifname=bc.bridge)
        if not br:
            raise fail(f"bridge {bc.bridge} is missing")
        host = host_veth_name(att.container_id, att.ifname)
        h = ipr.link_lookup(ifname=host)
        if not h:
            raise fail(f"host veth {host} is missing")
        hl = ipr.get_links(h[0])[0]
        if hl.get("master") != br[0]:
            raise fail(f"host veth {host} is not attached to {bc.bridge}")
        if hl.get("operstate") == "DOWN" or not hl["flags"] & 1:
            raise fail(f"host veth {host} is down")
        with netlink.iproute(att.netns) as c:
            idx = c.link_lookup(ifname=att.ifname)
            if not idx:
                raise fail(f"interface {att.ifname} is missing in {att.netns}")
            addrs = {(a.get("address"), a["prefixlen"]) for a in c.get_addr(index=idx[0])}
            if (str(att.address), att.subnet.prefixlen) not in addrs:
                raise fail(f"{att.ifname} does not hold {att.address}/{att.subnet.prefixlen}")
            for r in att.routes:
                kw: dict[str, Any] = {"dst_len": r.dst.prefixlen}
                if r.dst.prefixlen:
                    kw["dst"] = str(r.dst.network_address)
                found = [
                    x
                    for x in c.get_routes(family=2, table=254, **kw)
                    if x.get("gateway") == str(r.gw or att.gateway)
                ]
                if not found:
                    raise fail(f"route {r.dst} via {r.gw or att.gateway} is missing")

    # ------------------------------------------------------------ GC

    async def host_veths(self) -> set[str]:
        """Names of the node's links that follow our host veth pattern."""
        return await self._run(self._ops, self._host_veths)

    def _host_veths(self) -> set[str]:
        return {
            name
            for link in self.ipr.get_links()
            if HOST_NAME_RE.match(name := str(link.get("ifname")))
        }

    async def gc(self, bridge: str, valid: set[tuple[str, str]]) -> list[str]:
        return await self._run(self._ops, self._gc, bridge, valid)

    def _gc(self, bridge: str, valid: set[tuple[str, str]]) -> list[str]:
        """Delete our host veths (named by our pattern) whose attachment is not valid."""
        ipr = self.ipr
        br = ipr.link_lookup(ifname=bridge)
        keep = {host_veth_name(cid, ifname) for cid, ifname in valid}
        gone = []
        for link in ipr.get_links():
            name = str(link.get("ifname"))
            master = link.get("master")
            if (
                HOST_NAME_RE.match(name)
                and name not in keep
                and (not master or (bool(br) and master == br[0]))
            ):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=link["index"])
                gone.append(name)
        return gone
