"""LoadBalancer addresses announced on the underlay by exactly one node (MetalLB's L2 mode).

Every node's proxy runs the same election over the same objects, so they agree
without talking to each other: for each address a LoadBalancer Service of
corral's holds (status.loadBalancer.ingress, from a LoadBalancerPool), the
candidates are the Ready nodes matching the pool's nodeSelector (and, for
externalTrafficPolicy Local, having a ready endpoint of the Service); the
winner is the candidate with the smallest sha256(node + "#" + address)
(MetalLB's hash, so addresses spread over nodes and a node's loss moves only
its own). A node that stops being Ready (or whose proxy sees itself NotReady)
drops out, and the next one takes over.

Liveness faster than Node readiness (whose grace is 40 s): every proxy keeps a
key `/corral/v1/lbspeakers/<node>` on an etcd lease of SPEAKER_TTL seconds,
refreshed every SPEAKER_REFRESH; only nodes whose key exists are candidates. A
node that stops (or leaves the network) loses its key when the lease runs
out, and the others see the delete on their watch: failover in about
SPEAKER_TTL seconds, as MetalLB's memberlist notices a dead speaker. A
restarted proxy writes its key again under a new lease (the old one is not
revoked, so a restart moves nothing).

The kernel mechanism: the winner holds the address as a /32 on `lo` (labelled
`lo:corrallb`, how a restarted proxy finds its own). It is then a local address:
the kernel answers ARP requests for it on the underlay interface (arp_ignore 0)
and the service rules DNAT what arrives (their external-IP portals in
PREROUTING). On taking an address over, the node sends gratuitous ARP (request
and reply forms, three times within a second) from the interface holding its
InternalIP, so the neighbours' caches move to it at once rather than after
their entries go stale. Losing an address removes it; nothing else is needed.
A proxy that stops leaves its addresses (a restart converges without a gap).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import struct
from collections.abc import Iterable

from corral.api.informer import Informer, InformerFactory
from corral.api.loadbalancer import ingress_ips, ours, pool_of
from corral.api.objects import EndpointSlice, LoadBalancerPool, Node, Service
from corral.api.store import PREFIX, Store
from corral.common.labels import SERVICE_NAME_LABEL
from corral.daemon.runner import BoundedFrequencyRunner
from corral.node import netlink

log = logging.getLogger(__name__)

LABEL = "lo:corrallb"
SPEAKERS_PREFIX = f"{PREFIX}/lbspeakers/"
SPEAKER_TTL = 5  # seconds
SPEAKER_REFRESH = 1.5
GARP_ROUNDS = (0.0, 0.3, 0.7)  # seconds after a takeover


def elect(ip: str, candidates: Iterable[str]) -> str | None:
    """The node that announces `ip` among `candidates` (None: nobody may)."""
    return min(
        candidates,
        key=lambda n: hashlib.sha256(f"{n}#{ip}".encode()).digest(),
        default=None,
    )


def _matches(node: Node, selector: dict[str, str] | None) -> bool:
    labels = node.metadata.labels
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def garp_frames(ip: str, mac: bytes) -> list[bytes]:
    """Gratuitous ARP for `ip` from `mac`: the request form and the reply form."""
    addr = socket.inet_aton(ip)
    out = []
    for oper, target_mac in ((1, b"\x00" * 6), (2, b"\xff" * 6)):
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, oper) + mac + addr + target_mac + addr
        out.append(b"\xff" * 6 + mac + b"\x08\x06" + arp)
    return out


class Announcer:
    """The node's part of L2 announcement (a task of the proxy component)."""

    def __init__(self, informers: InformerFactory, node: str, store: Store | None = None) -> None:
        self.node = node
        self.store = store  # None: no speaker key (tests), readiness alone decides
        self.speakers: Informer[str] = informers.raw(SPEAKERS_PREFIX, _speaker)
        self.nodes: Informer[Node] = informers.informer(Node)
        self.pools: Informer[LoadBalancerPool] = informers.informer(LoadBalancerPool)
        self.services: Informer[Service] = informers.informer(Service)
        self.slices: Informer[EndpointSlice] = informers.informer(EndpointSlice)
        # a periodic pass re-checks the kernel (an address removed by hand comes back)
        self.runner = BoundedFrequencyRunner(
            "announce", self._sync, 0.05, 10.0, retry_initial=0.5, run_at_start=True
        )
        self.held: set[str] | None = None  # what lo holds (None: not read yet)
        self.takeovers = 0
        self._tasks: set[asyncio.Future[None]] = set()
        self._regs = [
            inf.on_change(lambda old, new: self.runner.run_soon())
            for inf in (self.nodes, self.pools, self.services, self.slices, self.speakers)
        ]

    def _local_nodes(self, svc: Service) -> set[str]:
        """Nodes with a ready endpoint of `svc` (externalTrafficPolicy Local)."""
        out: set[str] = set()
        for s in self.slices.values():
            if (
                s.namespace != svc.namespace
                or s.metadata.labels.get(SERVICE_NAME_LABEL) != svc.name
            ):
                continue
            for ep in s.endpoints:
                if ep.conditions.ready is not False and ep.node_name:
                    out.add(ep.node_name)
        return out

    def winners(self) -> dict[str, str]:
        """address -> the node that announces it."""
        pools = list(self.pools.values())
        nodes = [n for n in self.nodes.values() if n.ready]
        if self.store is not None:
            alive = set(self.speakers.values())
            nodes = [n for n in nodes if n.name in alive]
        out: dict[str, str] = {}
        for svc in self.services.values():
            if not ours(svc):
                continue
            for ip in ingress_ips(svc):
                pool = pool_of(ip, pools)
                if pool is None or ip in out:
                    continue
                cands = {n.name for n in nodes if _matches(n, pool.spec.node_selector)}
                if svc.spec.external_traffic_policy == "Local":
                    cands &= self._local_nodes(svc)
                winner = elect(ip, cands)
                if winner is not None:
                    out[ip] = winner
        return out

    def mine(self) -> set[str]:
        return {ip for ip, n in self.winners().items() if n == self.node}

    async def _sync(self, full: bool) -> None:
        want = self.mine()
        loop = asyncio.get_running_loop()
        new = await loop.run_in_executor(None, self._apply, want)
        if new:
            self.takeovers += len(new)
            log.info("announcing %s (gratuitous ARP)", ", ".join(sorted(new)))
            task = asyncio.ensure_future(self._garp(sorted(new)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _apply(self, want: set[str]) -> set[str]:
        """Make lo hold exactly `want` of our addresses; the ones added."""
        with netlink.iproute(None) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            have = {
                a.get_attr("IFA_ADDRESS")
                for a in ipr.get_addr(family=socket.AF_INET, index=lo)
                if a.get_attr("IFA_LABEL") == LABEL
            }
            for ip in sorted(have - want):
                ipr.addr("del", index=lo, address=ip, prefixlen=32)
                log.info("no longer announcing %s", ip)
            added = want - have
            for ip in sorted(added):
                ipr.addr("add", index=lo, address=ip, prefixlen=32, label=LABEL)
        self.held = set(want)
        return added

    def _underlay(self) -> tuple[str, bytes] | None:
        """(interface, MAC) holding the node's InternalIP."""
        node = self.nodes.get(self.node)
        ip = node.status.address("InternalIP") if node is not None else None
        if not ip:
            return None
        with netlink.iproute(None) as ipr:
            for a in ipr.get_addr(family=socket.AF_INET):
                if a.get_attr("IFA_ADDRESS") == ip:
                    link = ipr.get_links(a["index"])[0]
                    mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
                    return link.get_attr("IFLA_IFNAME"), mac
        return None

    async def _garp(self, ips: list[str]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for at in GARP_ROUNDS:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            try:
                await loop.run_in_executor(None, self._send_garp, ips)
            except OSError as e:
                log.warning("gratuitous ARP for %s: %s", ", ".join(ips), e)
                return

    def _send_garp(self, ips: list[str]) -> None:
        where = self._underlay()
        if where is None:
            return
        ifname, mac = where
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((ifname, 0))
            for ip in ips:
                if self.held is not None and ip not in self.held:
                    continue  # lost it meanwhile
                for frame in garp_frames(ip, mac):
                    s.send(frame)

    async def run(self) -> None:
        for inf in (self.nodes, self.pools, self.services, self.slices, self.speakers):
            await inf.wait_synced()
        if self.store is None:
            await self.runner.run()
            return
        beat = asyncio.create_task(self._speak(self.store), name="announce-speaker")
        try:
            await self.runner.run()
        finally:
            beat.cancel()

    async def _speak(self, store: Store) -> None:
        """Keep this node's speaker key alive (see the top)."""
        key, lease = SPEAKERS_PREFIX + self.node, None
        while True:
            try:
                if lease is None or await store.refresh_lease(lease) <= 0:
                    lease = await store.grant_lease(SPEAKER_TTL)
                    await store.put_raw(key, self.node.encode(), lease=lease)
            except Exception as e:  # StoreError, aetcd's own: try again, never stop
                log.warning("LoadBalancer speaker key: %s", e)
                lease = None
            await asyncio.sleep(SPEAKER_REFRESH)

    def remove(self) -> None:
        for r in self._regs:
            r.remove()

    def debug(self) -> dict[str, object]:
        return {"announcing": sorted(self.held or ()), "takeovers": self.takeovers}


def _speaker(value: bytes) -> str | None:
    try:
        return value.decode() or None
    except UnicodeDecodeError:
        return None


def cleanup() -> list[str]:
    """Remove every address the announcer put on lo (the proxy's --cleanup)."""
    done = []
    with netlink.iproute(None) as ipr:
        found = ipr.link_lookup(ifname="lo")
        if not found:
            return done
        for a in ipr.get_addr(family=socket.AF_INET, index=found[0]):
            if a.get_attr("IFA_LABEL") == LABEL:
                ip = a.get_attr("IFA_ADDRESS")
                with contextlib.suppress(Exception):
                    ipr.addr("del", index=found[0], address=ip, prefixlen=32)
                    done.append(f"address {ip} on lo")
    return done
