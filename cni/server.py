"""CNIServer: the node component that serves the corral-cni and corral-ipam shims.

It installs the shims into the CNI bin dir, serves a root-only unix socket, writes
the node's conflist once the overlay has leased a subnet (subnet.json), and answers
every CNI verb with the node's long-lived etcd and netlink connections.

Also a standalone daemon for tests and debugging:
    python -m corral.cni.server --etcd http://127.0.0.1:2379 --node n1 --run-dir DIR ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aetcd.exceptions
from prometheus_client.core import GaugeMetricFamily

from corral.api.objects import IPAllocation
from corral.api.store import Store, StoreError, Unavailable, pool_id
from corral.cni import errors as E
from corral.cni.bridge import Attachment, Plumber, host_veth_name
from corral.cni.config import (
    MAX_STDIN,
    SUPPORTED_VERSIONS,
    IPAMConfig,
    Net4,
    Range,
    Request,
    Route,
    parse_bridge,
    parse_ipam,
    parse_request,
    version_tuple,
)
from corral.cni.errors import CNIError
from corral.cni.install import install_shims, write_conflist
from corral.cni.ipam import IPAM, Allocated, pool_prefix
from corral.cni.sources import extra_source
from corral.common.metrics import register_collector
from corral.daemon import metrics
from corral.daemon.nodecontext import NodeContext
from corral.node.context import NodeOptions, NodePaths

# stdin plus the environment; anything longer is refused before it is parsed
MAX_REQUEST = MAX_STDIN + 64 * 1024
log = logging.getLogger(__name__)
CNI_VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
READ_TIMEOUT = 60.0  # a shim sends its whole request at once; a silent peer is dropped
DEFAULT_ROUTE = Route(ipaddress.IPv4Network("0.0.0.0/0"))
REAP_EVERY = 10.0  # s between reaper passes (attachments whose netns vanished)
REAP_AFTER = 10.0  # s: a younger allocation may belong to an ADD still in progress


def _epoch(iso: str | None) -> float:
    """Seconds since the epoch of an RFC 3339 time; 0 (very old) when unreadable."""
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


async def _read_bounded(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Everything until EOF, or the first `limit` bytes of it (the caller refuses those)."""
    data = bytearray()
    while len(data) < limit and (chunk := await reader.read(limit - len(data))):
        data += chunk
    return bytes(data)


class NodeSubnet:
    """subnet.json as written by the overlay, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.data: dict[str, Any] | None = None
        self.range: Range | None = None
        self.network: Net4 | None = None

    def refresh(self) -> bool:
        """Re-read if changed; True if the content changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            changed = self.data is not None
            self._stamp, self.data, self.range, self.network = None, None, None, None
            return changed
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        try:
            with open(self.path) as f:
                data = json.load(f)
            net = ipaddress.IPv4Network(data["subnet"])
            network = ipaddress.IPv4Network(data.get("network") or data["subnet"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s until it is valid: %s", self.path, e)
            return False  # half-written or bad: keep the previous view, retry later
        self._stamp, self.data, self.network = stamp, data, network
        self.range = Range(net, net[1], net[-2], net[1])
        return True

    @property
    def mtu(self) -> int:
        return int((self.data or {}).get("mtu") or 1500)


def convert_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """A 1.x result in the shape of `version` (0.3.x/0.4.0 tag each IP with version 4)."""
    out = dict(result, cniVersion=version)
    if version_tuple(version) < (1, 0, 0):
        out["ips"] = [dict(ip, version="4") for ip in result.get("ips", [])]
    return out


class CNIServer:
    """Node component (see docs/internals.md): start / run / stop."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.paths: NodePaths = ctx.paths
        self.subnet = NodeSubnet(self.paths.subnet_file)
        self.ipam = IPAM(ctx.store, ctx.node_name)
        self.plumber: Plumber | None = None
        self._server: asyncio.AbstractServer | None = None
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._conflist: str | None = None
        self._sock_id: tuple[int, int] | None = None  # (dev, inode) of the socket we bound
        self._unregister: Any = None
        self._next_reap = 0.0
        self.reaped = 0  # IPs the reaper released (attachments whose netns vanished)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        os.makedirs(self.paths.run_dir, exist_ok=True)
        install_shims(
            self.paths.cni_bin_dir,
            self.paths.cni_socket,
            native=self.ctx.options.cni_shim == "native",
        )
        self.plumber = Plumber(self.ctx.options.netns)
        await self._bind()
        self._sync_subnet()
        self._unregister = register_collector(self._pool_metrics)

    async def _bind(self) -> None:
        """Serve the CNI socket (root-only), replacing a stale one a dead daemon left."""
        if self._server is not None:
            self._server.close()
            self._server = None
        sock_path = self.paths.cni_socket
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(sock_path).st_mode):
                raise RuntimeError(
                    f"cannot serve {sock_path}: something that is not a socket is in the way"
                )
        if os.path.lexists(sock_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(sock_path)
            except OSError:
                os.unlink(sock_path)  # stale: its daemon is gone
            else:
                raise RuntimeError(f"another CNI daemon is serving {sock_path}")
            finally:
                probe.close()
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=sock_path)
        finally:
            os.umask(old)
        os.chmod(sock_path, 0o600)
        st = os.stat(sock_path)
        self._sock_id = (st.st_dev, st.st_ino)
        log.info("CNI daemon serving %s", sock_path)

    def _socket_intact(self) -> bool:
        """Is the socket path still the socket we serve (not removed or replaced)?"""
        try:
            st = os.stat(self.paths.cni_socket)
        except OSError:
            return False
        return self._server is not None and (st.st_dev, st.st_ino) == self._sock_id

    async def run(self) -> None:
        """Follow subnet.json: (re)write the conflist when the lease appears or changes.

        Also watch the socket path: if something removed or replaced it, runtimes can
        no longer reach us, so serve it again; if that fails (e.g. something else now
        occupies the path) this raises and the supervisor retries, reporting the node
        NotReady until it works.
        """
        while True:
            if not self._socket_intact():
                log.warning("%s was removed or replaced; serving it again", self.paths.cni_socket)
                self._sock_id = None
                await self._bind()
            self._sync_subnet()
            await self._load_pool()
            if time.monotonic() >= self._next_reap:
                self._next_reap = time.monotonic() + REAP_EVERY
                try:
                    await self.reap_vanished()
                except Exception as e:  # etcd away: the next pass tries again
                    log.warning("reaper pass failed: %s", e)
            await asyncio.sleep(0.5)

    async def _load_pool(self) -> None:
        """Know the node pool's usage before the first ADD (for its metrics)."""
        r = self.subnet.range
        if r is None:
            return
        try:
            await self.ipam.preload(r.pool)
        except Exception as e:  # etcd away: the next pass (or ADD) reads it
            log.debug("cannot read IPAM pool %s yet: %s", r.pool, e)

    def ready(self) -> bool:
        return self._socket_intact() and self.subnet.data is not None

    def debug_state(self) -> dict[str, Any]:
        return {
            "socket": self.paths.cni_socket,
            "socketIntact": self._socket_intact(),
            "subnet": self.subnet.data,
            "conflist": self._conflist,
            "allocated": self.ipam.usage(),
            "inFlight": len(self._locks),
            "reaped": self.reaped,
        }

    def _pool_metrics(self) -> list[Any]:
        """IPAM usage of this node's subnet pool, read at scrape time."""
        r = self.subnet.range
        if r is None:
            return []
        size = r.size() - sum(
            r.start <= x <= r.end
            for x in (r.gateway, r.subnet.network_address, r.subnet.broadcast_address)
        )
        used = self.ipam.usage().get(r.pool, 0)
        out = []
        for name, doc, value in (
            (metrics.IPAM_ALLOCATED_NAME, "Addresses allocated in the node's IPAM pool", used),
            (metrics.IPAM_SIZE_NAME, "Addresses the node's IPAM pool can hand out", size),
        ):
            fam = GaugeMetricFamily(name, doc, labels=["pool"])
            fam.add_metric([r.pool], value)
            out.append(fam)
        return out

    async def stop(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            if self._socket_intact():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.paths.cni_socket)
            self._server = None
        if self.plumber is not None:
            await self.plumber.drain()
            await asyncio.get_running_loop().run_in_executor(None, self.plumber.close)
            self.plumber = None

    def _sync_subnet(self) -> None:
        self.subnet.refresh()
        if self.subnet.data is not None:
            path = write_conflist(self.paths.cni_conf_dir, self.subnet.data, self.paths.cni_bin_dir)
            if self._conflist != path:
                log.info("node subnet %s: wrote %s", self.subnet.data.get("subnet"), path)
            self._conflist = path

    # ------------------------------------------------------------ wire

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await asyncio.wait_for(_read_bounded(reader, MAX_REQUEST + 1), READ_TIMEOUT)
            rc, out, err = await self.handle_raw(data)
            writer.write(b"%d\0%s\0%s" % (rc, err.encode(), out.encode()))
            await writer.drain()
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle_raw(self, data: bytes) -> tuple[int, str, str]:
        if len(data) > MAX_REQUEST:
            err = CNIError(
                E.DECODE_FAILURE,
                f"the request is larger than {MAX_REQUEST // 1024} KiB",
                "a network configuration is a few KiB; check what the runtime sends",
            )
            return 1, err.to_json("1.1.0"), ""
        plugin, _, rest = data.partition(b"\0")
        env_raw, _, stdin = rest.partition(b"\0\0")
        env = {}
        for item in env_raw.split(b"\0"):
            k, sep, v = item.decode(errors="replace").partition("=")
            if sep:
                env[k] = v
        return await self.handle(
            plugin.decode(errors="replace"), env, stdin.decode(errors="replace")
        )

    async def handle(self, plugin: str, env: dict[str, str], stdin: str) -> tuple[int, str, str]:
        """One CNI invocation: (exit code, stdout, stderr)."""
        t0 = time.perf_counter()
        rc, out, err = await self._handle(plugin, env, stdin)
        verb = env.get("CNI_COMMAND", "")
        verb = verb if verb in CNI_VERBS else "other"
        code = "0"
        if rc:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                code = str(json.loads(out).get("code", rc))
        metrics.CNI_REQUESTS.labels(verb, code).inc()
        metrics.CNI_REQUEST_SECONDS.labels(verb).observe(time.perf_counter() - t0)
        return rc, out, err

    async def _handle(self, plugin: str, env: dict[str, str], stdin: str) -> tuple[int, str, str]:
        version = "1.1.0"
        t0 = time.perf_counter()
        try:
            req = parse_request(plugin, env, stdin)
            version = req.cni_version
            result = await self.dispatch(req)
            log.debug(
                "%s %s %s/%s: %.1f ms",
                plugin,
                req.command,
                req.container_id,
                req.ifname,
                (time.perf_counter() - t0) * 1000,
            )
            return 0, "" if result is None else json.dumps(result), ""
        except CNIError as e:
            return 1, e.to_json(version), ""
        except (Unavailable, StoreError, aetcd.exceptions.ClientError, TimeoutError) as e:
            err = CNIError(E.TRY_AGAIN_LATER, "etcd is not answering", str(e))
            return 1, err.to_json(version), ""
        except Exception as e:
            log.exception("CNI %s %s failed", plugin, env.get("CNI_COMMAND"))
            return 1, CNIError(E.INTERNAL, f"internal error: {e}").to_json(version), ""

    # ------------------------------------------------------------ verbs

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
        async with self._attachment(req.container_id, req.ifname):
            if req.command == "ADD":
                return await self._add(req)
            if req.command == "DEL":
                await self._del(req)
                return None
            await self._check(req)
            return None

    @contextlib.asynccontextmanager
    async def _attachment(self, container_id: str, ifname: str) -> AsyncIterator[None]:
        """Hold the attachment's lock: ADD, DEL, CHECK and the reaper take turns on it."""
        key = (container_id, ifname)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    # ------------------------------------------------------------ reaper

    async def reap_vanished(self, min_age: float = REAP_AFTER) -> list[ipaddress.IPv4Address]:
        """Release the IPs of corral-cni attachments whose pod network namespace is gone.

        A runtime that loses a container behind its own back (its state wiped, the
        netns unmounted, the process killed) never sends DEL, and libcni 1.1 runtimes
        (containerd 1.6, podman 4) send no CNI GC either; containerd 1.6's `ctr` does
        not even DEL when a detached task is deleted. When a pod's namespace goes, the
        kernel removes both ends of its veth pair, and corral-cni names the host end
        from (containerID, ifname): an allocation of this node older than `min_age`
        whose host veth is missing and which no call holds is such a leftover. Its IP
        is released, the cached result any runtime kept for it is removed.
        """
        r = self.subnet.range
        if r is None or self.plumber is None:
            return []
        kvs, _ = await self.ipam.store.list_raw(pool_prefix(r.pool) + "ips/")
        recs = []
        for kv in kvs:
            with contextlib.suppress(ValueError):
                rec = IPAllocation.model_validate_json(kv.value)
                if rec.plugin == "corral-cni" and rec.node_name == self.ctx.node_name:
                    recs.append(rec)
        if not recs:
            return []
        live = await self.plumber.host_veths()
        now = time.time()
        freed = []
        for rec in recs:
            if host_veth_name(rec.container_id, rec.ifname) in live:
                continue
            if now - _epoch(rec.created_at) < min_age or (rec.container_id, rec.ifname) in (
                self._locks
            ):
                continue  # maybe an ADD still making its pair
            async with self._attachment(rec.container_id, rec.ifname):
                if host_veth_name(rec.container_id, rec.ifname) in await self.plumber.host_veths():
                    continue
                got = await self.ipam.release([r.pool], rec.container_id, rec.ifname)
            freed += got
            self.reaped += len(got)
            gone = self._forget_cached(rec.container_id, rec.ifname)
            log.info(
                "reaper: %s/%s (pod %s/%s) lost its network namespace without a DEL: released %s%s",
                rec.container_id,
                rec.ifname,
                rec.pod_namespace or "-",
                rec.pod_name or "-",
                ", ".join(map(str, got)) or "nothing",
                f", removed cached result {', '.join(gone)}" if gone else "",
            )
        return freed

    def _forget_cached(self, container_id: str, ifname: str) -> list[str]:
        """Remove libcni result caches (`<network>-<containerID>-<ifname>`) of it."""
        d = os.path.join(self.paths.cni_cache_dir, "results")
        gone = []
        with contextlib.suppress(OSError):
            for name in os.listdir(d):
                if name.endswith(f"-{container_id}-{ifname}"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, name))
                        gone.append(name)
        return gone

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
        assert self.plumber is not None
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
            assert self.plumber is not None
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
        assert self.plumber is not None
        await self.plumber.check(bc, att)

    async def _gc(self, req: Request) -> None:
        valid = req.valid_attachments()
        ipc = parse_ipam(req.conf, {})
        freed = await self.ipam.gc(self._pools(req, ipc), valid)
        gone: list[str] = []
        if req.plugin == "corral-cni":
            bc = parse_bridge(req.conf)
            assert self.plumber is not None
            gone = await self.plumber.gc(bc.bridge, valid)
        if freed or gone:
            log.info("GC released %d IPs and %d veths", len(freed), len(gone))


# ---------------------------------------------------------------- standalone daemon


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m corral.cni.server", description="Serve corral-cni/corral-ipam for one node."
    )
    p.add_argument("--etcd", default=os.environ.get("CORRAL_ETCD", "http://127.0.0.1:2379"))
    p.add_argument("--node", required=True, help="this node's name")
    d = NodePaths()
    p.add_argument("--run-dir", default=d.run_dir)
    p.add_argument("--conf-dir", default=d.cni_conf_dir)
    p.add_argument("--bin-dir", default=d.cni_bin_dir)
    p.add_argument("--cache-dir", default=d.cni_cache_dir)
    p.add_argument(
        "--netns",
        help="do the kernel work in this network namespace (name or "
        "path) while talking to etcd from the current one; for tests and debugging",
    )
    p.add_argument(
        "--shim",
        choices=("python", "native"),
        default="native",
        help="install the C forwarder (default) or the Python shim",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> int:
    from corral.daemon.core import Daemon  # the one daemon skeleton

    store = Store(args.etcd)
    paths = NodePaths(
        run_dir=args.run_dir,
        cni_conf_dir=args.conf_dir,
        cni_bin_dir=args.bin_dir,
        cni_cache_dir=args.cache_dir,
    )
    options = NodeOptions(netns=args.netns or None, cni_shim=args.shim)
    ctx = NodeContext(node_name=args.node, store=store, paths=paths, options=options)
    daemon = Daemon("cni", args.node, store, configure_logging=True)
    daemon.add("cni", CNIServer(ctx))
    await daemon.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return asyncio.run(_serve_forever(args))
    except ValueError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
