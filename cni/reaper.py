"""The reaper: release the IPs of attachments whose pod network namespace vanished."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import time
from datetime import datetime

from corral.api.objects import IPAllocation
from corral.cni.bridge import host_veth_name
from corral.cni.ipam import pool_prefix
from corral.cni.verbs import Verbs

log = logging.getLogger("corral.cni.server")
REAP_EVERY = 10.0  # s between reaper passes (attachments whose netns vanished)
REAP_AFTER = 10.0  # s: a younger allocation may belong to an ADD still in progress


def _epoch(iso: str | None) -> float:
    """Seconds since the epoch of an RFC 3339 time; 0 (very old) when unreadable."""
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class Reaper:
    def __init__(self, verbs: Verbs, cache_dir: str) -> None:
        self.verbs = verbs
        self.cache_dir = cache_dir
        self.reaped = 0  # IPs released so far
        self._next = 0.0

    async def maybe_reap(self) -> None:
        """A pass every REAP_EVERY seconds (called from the server's loop)."""
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + REAP_EVERY
        try:
            await self.reap_vanished()
        except Exception as e:  # etcd away: the next pass tries again
            log.warning("reaper pass failed: %s", e)

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
        v = self.verbs
        r = v.subnet.range
        if r is None:
            return []
        kvs, _ = await v.ipam.store.list_raw(pool_prefix(r.pool) + "ips/")
        recs = []
        for kv in kvs:
            with contextlib.suppress(ValueError):
                rec = IPAllocation.model_validate_json(kv.value)
                if rec.plugin == "corral-cni" and rec.node_name == v.ctx.node_name:
                    recs.append(rec)
        if not recs:
            return []
        live = await v.plumber.host_veths()
        now = time.time()
        freed = []
        for rec in recs:
            if host_veth_name(rec.container_id, rec.ifname) in live:
                continue
            if now - _epoch(rec.created_at) < min_age or (rec.container_id, rec.ifname) in (
                v.locks
            ):
                continue  # maybe an ADD still making its pair
            async with v.attachment(rec.container_id, rec.ifname):
                if host_veth_name(rec.container_id, rec.ifname) in await v.plumber.host_veths():
                    continue
                got = await v.ipam.release([r.pool], rec.container_id, rec.ifname)
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
        d = os.path.join(self.cache_dir, "results")
        gone = []
        with contextlib.suppress(OSError):
            for name in os.listdir(d):
                if name.endswith(f"-{container_id}-{ifname}"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, name))
                        gone.append(name)
        return gone
