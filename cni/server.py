"""CNIServer: the node component that serves the corral-cni and corral-ipam shims.

It installs the shims into the CNI bin dir, serves a root-only unix socket, writes
the node's conflist once the overlay has leased a subnet (subnet.json), and answers
every CNI verb (cni/verbs.py) with the node's long-lived etcd and netlink
connections; a reaper (cni/reaper.py) releases what no DEL ever will.
`corral node --components cni` runs it alone (`--netns` for the kernel work in
another namespace: tests, debugging).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from typing import Any

import aetcd.exceptions
from prometheus_client.core import GaugeMetricFamily

from corral.api.store import StoreError, Unavailable
from corral.cni import errors as E
from corral.cni.bridge import Plumber
from corral.cni.config import MAX_STDIN, parse_request
from corral.cni.errors import CNIError
from corral.cni.install import install_shims, write_conflist
from corral.cni.ipam import IPAM
from corral.cni.reaper import Reaper
from corral.cni.subnet import NodeSubnet
from corral.cni.verbs import Verbs
from corral.common.metrics import register_collector
from corral.daemon import metrics
from corral.daemon.nodecontext import NodeContext
from corral.node.context import NodePaths

# stdin plus the environment; anything longer is refused before it is parsed
MAX_REQUEST = MAX_STDIN + 64 * 1024
log = logging.getLogger(__name__)
CNI_VERBS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
READ_TIMEOUT = 60.0  # a shim sends its whole request at once; a silent peer is dropped


async def _read_bounded(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Everything until EOF, or the first `limit` bytes of it (the caller refuses those)."""
    data = bytearray()
    while len(data) < limit and (chunk := await reader.read(limit - len(data))):
        data += chunk
    return bytes(data)


class CNIServer:
    """Node component (see docs/internals.md): start / run / stop."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.paths: NodePaths = ctx.paths
        self.subnet = NodeSubnet(self.paths.subnet_file)
        self.ipam = IPAM(ctx.store, ctx.node_name)
        self.plumber: Plumber | None = None
        self.verbs: Verbs | None = None
        self.reaper: Reaper | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conflist: str | None = None
        self._sock_id: tuple[int, int] | None = None  # (dev, inode) of the socket we bound
        self._unregister: Any = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        os.makedirs(self.paths.run_dir, exist_ok=True)
        install_shims(
            self.paths.cni_bin_dir,
            self.paths.cni_socket,
            native=self.ctx.options.cni_shim == "native",
        )
        self.plumber = Plumber(self.ctx.options.netns)
        self.verbs = Verbs(self.ctx, self.subnet, self.ipam, self.plumber)
        self.reaper = Reaper(self.verbs, self.paths.cni_cache_dir)
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
            if self.reaper is not None:
                await self.reaper.maybe_reap()
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
            "inFlight": len(self.verbs.locks) if self.verbs else 0,
            "reaped": self.reaper.reaped if self.reaper else 0,
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
            self.plumber = self.verbs = self.reaper = None

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
            if self.verbs is None:
                raise CNIError(E.TRY_AGAIN_LATER, "the CNI server is starting or stopping")
            result = await self.verbs.dispatch(req)
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
