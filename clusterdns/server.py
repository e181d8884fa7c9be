"""`DNSServer`: the `corral dns` component (informers -> index -> UDP/TCP answers).

Services, EndpointSlices and v1 Endpoints come from the process's shared
informers (raw ones with slim decoders, views.py); each change marks its Service
dirty and one flush per loop turn re-renders the dirty Services into the
`ZoneIndex`, so an answer reflects a watch event as soon as the event has
reached the handler. Before the first full sync every query is answered
SERVFAIL and `/readyz` fails.

UDP is served on the event loop itself: a reader callback drains the socket (so
the loop still runs the informers and the forwarder between batches). Each
datagram first tries the fast path: a query that is exactly one question
(optionally with an OPT record without options) is looked up, its question
lower-cased, in `ZoneIndex.fast` and answered by joining the query's ID, a
pre-built header, the question as sent and the pre-rendered records; a name of
the zone that does not exist gets the pre-built NXDOMAIN the same way. The fast
path is fastpath.c (recvmmsg/sendmmsg, 64 datagrams a call) when it builds, else
`_on_udp_python`, which does the same. Anything else goes through the full
parser and `Resolver`. TCP is an asyncio server on the full path (RFC 7766:
several queries per connection, an idle timeout).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from corral.api.informer import BY_POD_IP, Informer, InformerFactory, by_pod_ip
from corral.api.objects import Endpoints, EndpointSlice, NetworkConfig, Pod, Service
from corral.api.store import Store, kind_prefix, object_key
from corral.clusterdns import wire
from corral.clusterdns.answer import Resolver
from corral.clusterdns.forward import Forwarder
from corral.clusterdns.records import ZoneIndex
from corral.clusterdns.views import (
    EndpointsInfo,
    ServiceInfo,
    SliceInfo,
    decode_endpoints,
    decode_service,
    decode_slice,
)
from corral.common.metrics import register_collector

log = logging.getLogger(__name__)

BATCH = 256  # datagrams per reader callback before the loop gets a turn
TCP_IDLE = 10.0  # seconds a TCP client may stay silent between queries
MAX_PENDING = 1000  # forwarded queries in flight; beyond that, SERVFAIL at once
MAX_TCP = 512  # open TCP connections; beyond that, new ones are closed at once
BY_SERVICE_NAME = "dnsServiceName"

_QD1 = b"\x00\x01" + b"\x00" * 6
_QD1_AR1 = b"\x00\x01" + b"\x00" * 5 + b"\x01"
_OPT_HEAD = b"\x00\x00\x29"
_LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 2.5)


def by_service_name(s: SliceInfo) -> list[str]:
    """A slice under the Service its `kubernetes.io/service-name` label names."""
    return [f"{s.namespace}/{s.service}"] if s.service else []


@dataclass
class Config:
    listen: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 53)])
    zone: str | None = None  # None: NetworkConfig's clusterDomain, else cluster.local
    ttl: int = 5
    upstreams: list[tuple[str, int]] = field(default_factory=list)
    pods: str = "insecure"
    forward_timeout: float = 2.0
    cache_size: int = 1000
    fastpath: str = "native"  # or "python" (the same answers, slower)


class Latency:
    """A histogram cheap enough for the hot path: observe(value, n) adds n at once."""

    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += n
        self.sum += v * n

    def family_buckets(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip((*self.buckets, float("inf")), self.counts, strict=True):
            acc += c
            out.append(("+Inf" if b == float("inf") else repr(b), acc))
        return out


class Stats:
    def __init__(self) -> None:
        self.queries: dict[tuple[int, int], int] = {}  # (qtype, rcode) -> n, full path
        self.fast_ok: dict[int, int] = {}  # qtype -> NOERROR answers from the fast path
        self.fast_nx: dict[int, int] = {}  # qtype -> NXDOMAIN answers from the fast path
        self.dropped = 0  # malformed beyond an answer
        self.formerr = 0
        self.send_errors = 0
        self.overload = 0  # SERVFAIL because too many forwards were in flight
        self.tcp_connections = 0
        self.latency = {"fast": Latency(), "zone": Latency(), "forward": Latency()}

    def count(self, qtype: int, answer: bytes) -> None:
        rcode = answer[3] & 0xF if len(answer) >= 4 else wire.SERVFAIL
        k = (qtype, rcode)
        self.queries[k] = self.queries.get(k, 0) + 1

    def by_type_rcode(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}

        def add(t: int, rc: int, n: int) -> None:
            k = (wire.type_name(t), wire.RCODE_NAMES.get(rc, str(rc)))
            out[k] = out.get(k, 0) + n

        for (t, rc), n in self.queries.items():
            add(t, rc, n)
        for t, n in self.fast_ok.items():
            add(t, wire.NOERROR, n)
        for t, n in self.fast_nx.items():
            add(t, wire.NXDOMAIN, n)
        return out


class DNSServer:
    def __init__(self, store: Store, informers: InformerFactory, config: Config) -> None:
        self.store = store
        self.informers = informers
        self.config = config
        # Raw informers with slim decoders (views.py): DNS reads a few fields of each.
        self.services: Informer[ServiceInfo] = informers.raw(kind_prefix(Service), decode_service)
        self.slices: Informer[SliceInfo] = informers.raw(kind_prefix(EndpointSlice), decode_slice)
        self.slices.add_index(BY_SERVICE_NAME, by_service_name)
        self.endpoints: Informer[EndpointsInfo] = informers.raw(
            kind_prefix(Endpoints), decode_endpoints
        )
        self.pods: Informer[Pod] | None = None
        if config.pods == "verified":
            self.pods = informers.informer(Pod)
            self.pods.add_index(BY_POD_IP, by_pod_ip)
        self.index: ZoneIndex | None = None
        self.resolver: Resolver | None = None
        self.forwarder = Forwarder(
            config.upstreams, timeout=config.forward_timeout, cache_size=config.cache_size
        )
        self.stats = Stats()
        self.synced = False
        self.synced_at: float | None = None
        self.udp: list[socket.socket] = []
        self.tcp: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []  # what we listen on (ports resolved)
        self._dirty: set[str] = set()
        self._flush_scheduled = False
        self._regs: list[Any] = []
        self._pending: set[asyncio.Task] = set()
        self._unregister_metrics: Any = None
        self._nx: tuple[bytes, ...] = ()
        self._tcp_open = 0
        self.native: Any = None  # the compiled fast path (native.py), if it built

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        zone, dns_ip = self.config.zone, None
        cfg = await self.store.get(NetworkConfig, "cluster")
        if cfg is not None:
            zone = zone or cfg.spec.cluster_domain
            dns_ip = cfg.spec.cluster_dns
        self.index = ZoneIndex(zone or "cluster.local", self.config.ttl, dns_ip=dns_ip)
        self.resolver = Resolver(
            self.index, self.forwarder, pods=self.config.pods, pod_exists=self._pod_exists
        )
        self._build_nx()
        if self.config.fastpath == "native":
            from corral.clusterdns import native

            self.native = await asyncio.get_running_loop().run_in_executor(None, native.load)
        ups = [u for u in self.config.upstreams if not self._is_self(u, dns_ip)]
        if len(ups) != len(self.config.upstreams):
            log.warning("left out upstreams that are this server itself (a forwarding loop)")
        self.forwarder.upstreams = ups
        if not ups:
            log.warning(
                "no upstream resolvers: names outside %s will get SERVFAIL", self.index.zone
            )
        await self._listen()
        self._regs = [
            self.services.on_change(self._service_changed),
            self.slices.on_change(self._slice_changed),
            self.endpoints.on_change(self._endpoints_changed),
        ]
        self._unregister_metrics = register_collector(self.collect)
        self.informers.start()
        log.info(
            "dns serving %s on %s (ttl %ds, pods %s, upstreams %s)",
            self.index.zone,
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            self.config.ttl,
            self.config.pods,
            ", ".join(f"{h}:{p}" for h, p in ups) or "none",
        )

    def _is_self(self, upstream: tuple[str, int], dns_ip: str | None) -> bool:
        host, port = upstream
        if host == dns_ip:
            return True
        for lh, lp in self.config.listen:
            if port == lp and (host == lh or (lh == "0.0.0.0" and host.startswith("127."))):
                return True
        return False

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.config.listen:
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.udp.append(u)
                u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                with contextlib.suppress(OSError):
                    u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
                    u.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
                u.bind((host, port))
                u.setblocking(False)
                port = u.getsockname()[1]  # port 0: the kernel chose; TCP takes the same
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    t.bind((host, port))
                except OSError:
                    t.close()
                    raise
                t.listen(128)
                t.setblocking(False)
                self.tcp.append(await asyncio.start_server(self._tcp_client, sock=t))
                loop.add_reader(u.fileno(), self._on_udp, u)
                self.addresses.append((host, port))
        except OSError as e:
            await self._close()
            raise RuntimeError(
                f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --listen; "
                "port 53 needs root or CAP_NET_BIND_SERVICE)"
            ) from None

    async def run(self) -> None:
        infs = (self.services, self.slices, self.endpoints)
        await asyncio.gather(*(inf.wait_synced() for inf in infs))
        await asyncio.gather(*(r.wait_synced() for r in self._regs))
        if self.pods is not None:
            await self.pods.wait_synced()
        self._flush()
        assert self.index is not None and self.resolver is not None
        self.synced = self.resolver.synced = True
        self.synced_at = time.time()
        log.info("dns synced: %d services, %d records", self.index.services, self.index.size)
        await asyncio.Event().wait()

    async def stop(self) -> None:
        for r in self._regs:
            r.remove()
        self._regs = []
        for t in list(self._pending):
            t.cancel()
        await self._close()
        if self._unregister_metrics is not None:
            self._unregister_metrics()
            self._unregister_metrics = None

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        for u in self.udp:
            with contextlib.suppress(Exception):
                loop.remove_reader(u.fileno())
            u.close()
        for s in self.tcp:
            s.close()
            with contextlib.suppress(Exception):
                await s.wait_closed()
        self.udp, self.tcp = [], []

    def ready(self) -> bool:
        return self.synced

    # ------------------------------------------------------------ the index

    def _pod_exists(self, namespace: str, ip: str) -> bool:
        if self.pods is None:
            return False
        return any(p.namespace == namespace for p in self.pods.by_index(BY_POD_IP, ip))

    def _mark(self, key: str) -> None:
        self._dirty.add(key)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _service_changed(self, old: ServiceInfo | None, new: ServiceInfo | None) -> None:
        obj = new or old
        if obj is not None:
            self._mark(obj.key)

    def _slice_changed(self, old: SliceInfo | None, new: SliceInfo | None) -> None:
        for s in (old, new):
            if s is not None:
                for key in by_service_name(s):
                    self._mark(key)

    def _endpoints_changed(self, old: EndpointsInfo | None, new: EndpointsInfo | None) -> None:
        for e in (old, new):
            if e is not None and not e.managed:
                self._mark(f"{e.namespace}/{e.name}")

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.index is None:
            return
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            ns, _, name = key.partition("/")
            svc = self.services.cache.get(object_key(Service, name, ns))
            slices = self.slices.by_index(BY_SERVICE_NAME, key) if svc is not None else []
            if svc is not None and not slices:  # a user's Endpoints, if that is all there is
                ep = self.endpoints.cache.get(object_key(Endpoints, name, ns))
                if ep is not None:
                    slices = list(ep.subsets)
            try:
                self.index.set_service(key, svc, slices)
            except Exception:  # one odd object must not stop the others
                log.exception("dns: cannot index service %s", key)

    # ------------------------------------------------------------ UDP

    def _build_nx(self) -> None:
        assert self.index is not None
        soa = self.index.soa_authority.data
        heads = []
        for edns in (0, 1):
            for rd in (0, 1):
                flags = wire.flags_of(0x0100 * rd, wire.NXDOMAIN, aa=True)
                heads.append(struct.pack("!HHHHH", flags, 1, 0, 1, edns))
        self._nx = (*heads, soa)

    def _on_udp(self, sock: socket.socket) -> None:
        if self.native is None:
            self._on_udp_python(sock)
            return
        index = self.index
        assert index is not None
        stats = self.stats
        t0 = time.perf_counter()
        try:
            misses, answered, send_errors = self.native.serve(
                sock.fileno(),
                index.fast,
                index.names,
                index.ents,
                index.zone_wire,
                self._nx,
                self.resolver is not None and self.resolver.pods != "disabled",
                self.synced,
                stats.fast_ok,
                stats.fast_nx,
            )
        except OSError:
            return
        if answered:
            stats.latency["fast"].observe((time.perf_counter() - t0) / answered, answered)
        stats.send_errors += send_errors
        for data, addr in misses:
            self._slow_udp(sock, data, addr)

    def _on_udp_python(self, sock: socket.socket) -> None:
        """The fast path in Python (what fastpath.c does, when it cannot be built)."""
        recv, send = sock.recvfrom, sock.sendto
        index = self.index
        assert index is not None
        if not self.synced:  # the full path answers SERVFAIL until the first full sync
            for _ in range(BATCH):
                try:
                    data, addr = recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                self._slow_udp(sock, data, addr)
            return
        fast_get = index.fast.get
        nx_ok = self._nx_ok
        nx = self._nx
        fast_ok, fast_nx = self.stats.fast_ok, self.stats.fast_nx
        opt = wire.opt_rr()
        t0 = time.perf_counter()
        fast_n = 0
        for _ in range(BATCH):
            try:
                data, addr = recv(65535)
            except BlockingIOError:
                break
            except OSError:  # an ICMP error for an earlier answer: nothing to do
                continue
            b2 = data[2] if len(data) > 12 else 0xFF
            if not b2 & 0xF8:  # a QUERY, not a response
                counts = data[4:12]
                if counts == _QD1:
                    q, edns = data[12:], 0
                elif (
                    counts == _QD1_AR1
                    and data[-11:-8] == _OPT_HEAD
                    and data[-5] == 0
                    and data[-2:] == b"\x00\x00"
                ):
                    q, edns = data[12:-11], 2
                else:
                    q = b""
                if q:
                    key = q.lower()
                    e = fast_get(key)
                    try:
                        if e is not None:
                            out = data[:2] + e[(b2 & 1) | edns] + q + e[4]
                            send(out + opt if edns else out, addr)
                            t = e[5]
                            fast_ok[t] = fast_ok.get(t, 0) + 1
                            fast_n += 1
                            continue
                        if nx_ok(key):
                            out = data[:2] + nx[(b2 & 1) | edns] + q + nx[4]
                            send(out + opt if edns else out, addr)
                            t2 = (key[-4] << 8) | key[-3]
                            fast_nx[t2] = fast_nx.get(t2, 0) + 1
                            fast_n += 1
                            continue
                    except OSError:
                        self.stats.send_errors += 1
                        continue
            self._slow_udp(sock, data, addr)
        if fast_n:
            self.stats.latency["fast"].observe((time.perf_counter() - t0) / fast_n, fast_n)

    def _nx_ok(self, key: bytes) -> bool:
        """A lower-cased question (name + type + class IN) whose name is in the zone,
        does not exist and is not a pod name: the pre-built NXDOMAIN fits."""
        index = self.index
        assert index is not None
        if key[-2:] != b"\x00\x01":
            return False
        name = key[:-4]
        z = index.zone_wire
        cut = len(name) - len(z)
        if cut <= 0 or not name.endswith(z) or len(name) > 255:
            return False
        i = last = 0
        while i < cut:
            n = name[i]
            if not 0 < n < 64:
                return False
            last = i
            i += 1 + n
        if i != cut or name in index.names or name in index.ents:
            return False
        pods = self.resolver is not None and self.resolver.pods != "disabled"
        return not (pods and name[last:cut] == b"\x03pod")

    def _slow_udp(self, sock: socket.socket, data: bytes, addr: Any) -> None:
        t0 = time.perf_counter()
        ans = self._answer(data, tcp=False)
        if ans is None:
            return
        if isinstance(ans, bytes):
            self._send(sock, ans, addr)
            self.stats.latency["zone"].observe(time.perf_counter() - t0)
            return
        self._later(ans, lambda out: self._send(sock, out, addr), t0)

    def _send(self, sock: socket.socket, ans: bytes, addr: Any) -> None:
        try:
            sock.sendto(ans, addr)
        except OSError:
            self.stats.send_errors += 1

    def _later(self, coro: Any, deliver: Any, t0: float) -> None:
        q, c = coro

        async def go() -> None:
            try:
                out = await c
            except Exception:
                log.exception("dns: answering %s failed", wire.decode_name(q.qname))
                out = wire.error(q.id, q.flags, wire.SERVFAIL, q.question, q.edns)
            self.stats.count(q.qtype, out)
            self.stats.latency["forward"].observe(time.perf_counter() - t0)
            deliver(out)

        task = asyncio.get_running_loop().create_task(go())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _answer(self, data: bytes, tcp: bool) -> bytes | tuple[Any, Any] | None:
        """The full path: bytes, (query, coroutine) when upstreams are asked, or None
        (drop)."""
        assert self.resolver is not None
        try:
            q = wire.parse_query(data)
        except wire.Drop:
            self.stats.dropped += 1
            return None
        except wire.FormErr as e:
            self.stats.formerr += 1
            return wire.error(e.qid, e.flags, wire.FORMERR)
        try:
            ans = self.resolver.answer(q, data, tcp)
        except Exception:
            log.exception("dns: answering %s failed", wire.decode_name(q.qname))
            ans = wire.error(q.id, q.flags, wire.SERVFAIL, q.question, q.edns)
        if isinstance(ans, bytes):
            self.stats.count(q.qtype, ans)
            return ans
        if len(self._pending) >= MAX_PENDING:
            ans.close()
            self.stats.overload += 1
            out = wire.error(q.id, q.flags, wire.SERVFAIL, q.question, q.edns)
            self.stats.count(q.qtype, out)
            return out
        return (q, ans)

    # ------------------------------------------------------------ TCP

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.tcp_connections += 1
        self._tcp_open += 1
        try:
            while self._tcp_open <= MAX_TCP:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                (n,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE)
                t0 = time.perf_counter()
                ans = self._answer(data, tcp=True)
                if ans is None:
                    continue
                if isinstance(ans, tuple):
                    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                    self._later(ans, done.set_result, t0)
                    out = await done
                else:
                    out = ans
                    self.stats.latency["zone"].observe(time.perf_counter() - t0)
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # ------------------------------------------------------------ observability

    def collect(self) -> Iterable[Any]:
        q = CounterMetricFamily(
            "corral_dns_queries",
            "DNS queries answered, by type and rcode",
            labels=["type", "rcode"],
        )
        for (t, rc), n in sorted(self.stats.by_type_rcode().items()):
            q.add_metric([t, rc], n)
        yield q
        h = HistogramMetricFamily(
            "corral_dns_request_duration_seconds",
            "Time from reading a query to sending its answer, by path (fast: the hot "
            "path's per-query average over each batch)",
            labels=["path"],
        )
        for path, lat in self.stats.latency.items():
            h.add_metric([path], lat.family_buckets(), lat.sum)
        yield h
        fs, st, ix = self.forwarder.stats, self.stats, self.index
        for name, doc, v in (
            ("cache_hits", "Forwarded queries answered from the cache", fs.cache_hits),
            ("cache_misses", "Forwarded queries not in the cache", fs.cache_misses),
            ("forward_requests", "Queries sent to upstreams (each try)", fs.requests),
            ("forward_timeouts", "Upstream tries that timed out", fs.timeouts),
            ("forward_tcp_retries", "Truncated upstream answers asked over TCP", fs.tcp_retries),
            ("forward_failures", "Queries no upstream answered (SERVFAIL)", fs.failures),
            ("malformed_dropped", "Packets dropped unanswered", st.dropped),
            ("malformed_formerr", "Malformed queries answered FORMERR", st.formerr),
            ("send_errors", "Answers the socket refused", st.send_errors),
            ("index_changes", "Changes applied to the index", ix.changes if ix else 0),
        ):
            c = CounterMetricFamily("corral_dns_" + name, doc)
            c.add_metric([], v)
            yield c
        for name, doc, v in (
            ("synced", "1 once the first full sync is in the index", int(self.synced)),
            ("index_records", "Resource records in the index", ix.size if ix else 0),
            ("index_names", "Names in the index", len(ix.names) if ix else 0),
            ("index_services", "Services in the index", ix.services if ix else 0),
            ("cache_entries", "Entries in the forwarding cache", len(self.forwarder.cache)),
        ):
            g = GaugeMetricFamily("corral_dns_" + name, doc)
            g.add_metric([], v)
            yield g

    def debug_state(self) -> dict[str, Any]:
        ix = self.index
        queries = self.stats.by_type_rcode()
        return {
            "zone": ix.zone if ix else None,
            "listen": [f"{h}:{p}" for h, p in self.addresses],
            "upstreams": [f"{h}:{p}" for h, p in self.forwarder.upstreams],
            "pods": self.config.pods,
            "ttl": self.config.ttl,
            "synced": self.synced,
            "syncedAt": self.synced_at,
            "services": ix.services if ix else 0,
            "names": len(ix.names) if ix else 0,
            "records": ix.size if ix else 0,
            "fastEntries": len(ix.fast) if ix else 0,
            "cacheEntries": len(self.forwarder.cache),
            "queries": {f"{t}/{rc}": n for (t, rc), n in sorted(queries.items())},
            "forward": vars(self.forwarder.stats),
            "pendingForwards": len(self._pending),
        }
