"""PodRuntime: the node component that runs the pods bound to this node (kubelet-like).

It follows the Pod objects of this node through the process's informer and
gives each pod a `PodWorker` (runtime/podworker.py), which makes its sandbox,
runs its containers (`ContainerRunner`, runtime/containerrunner.py) and
reports its status (`PodStatusWriter`, runtime/podstatus.py). On start it
adopts the pods a previous run left running (their state is under
<state_dir>/pods/<uid>/), tears down those whose object is gone and garbage
collects CNI attachments; it keeps the etcd guard (runtime/etcdguard.py) in
step with the pods that may reach etcd. Stopping it leaves the pods running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from corral.api import netconfig
from corral.api.informer import BY_NODE, Informer, Registration, by_node
from corral.api.objects import (
    ConfigMap,
    Namespace,
    NetworkConfig,
    NetworkSpec,
    Node,
    Pod,
    Secret,
    Service,
    TypedObject,
)
from corral.cni.client import CNIClient, CNIError, is_pod_sandbox
from corral.daemon.nodecontext import NodeContext
from corral.node import netns
from corral.runtime import containers, credentials, envvars, etcdguard, podstate
from corral.runtime.cgroups import PodCgroups
from corral.runtime.podstate import PodSaved
from corral.runtime.podworker import PodWorker

log = logging.getLogger(__name__)

GUARD_RESYNC_SECONDS = 30.0  # how often the etcd guard is checked and repaired


class PodRuntime:
    """Node component: runs every pod whose spec.nodeName is this node."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        p = ctx.paths
        self.cni = CNIClient(p.cni_bin_dir, p.cni_cache_dir)
        # CNI ADDs at once. Plugin chains are CPU-bound execs: when many pods start
        # together, a few at a time finish sooner (less contention) than all at once,
        # and each pod goes on to start its containers as soon as its own ADD is done.
        self.cni_slots = asyncio.Semaphore(max(4, 4 * (os.cpu_count() or 1)))
        self.backoff_base = ctx.options.restart_backoff
        self.workers: dict[str, PodWorker] = {}  # by uid
        self.by_key: dict[str, str] = {}  # ns/name -> uid
        self.saved: dict[str, PodSaved] = {}
        # Pods this runtime has finished with: a late event for one must not restart it.
        self.finished: dict[str, None] = {}
        self.host_ip: str | None = ctx.underlay_ip
        # The cluster's DNS address and zone for pods' resolv.conf: NetworkConfig is their
        # one source, read at start and followed through its informer.
        self.network = NetworkSpec()
        informers = ctx.informers
        self.pods: Informer[Pod] = informers.informer(Pod)
        self.pods.add_index(BY_NODE, by_node)
        self.configs: Informer[NetworkConfig] = informers.informer(NetworkConfig)
        # What pods' volumes and env take from (runtime/volumes.py, runtime/envvars.py).
        self.config_maps: Informer[ConfigMap] = informers.informer(ConfigMap)
        self.secrets: Informer[Secret] = informers.informer(Secret)
        # Services for the pods' link variables (KUBERNETES_SERVICE_HOST, ...), as kubelet's
        self.services: Informer[Service] = informers.informer(Service)
        self.namespaces: Informer[Namespace] = informers.informer(Namespace)  # their labels
        self._object_regs: list[Registration] = []
        self._pods_reg: Registration | None = None
        self._config_reg: Registration | None = None
        # Pod events wait for run()'s start-up (orphans torn down, CNI garbage collected):
        # no pod may start a sandbox while the GC decides what to keep.
        self._adopting_done = asyncio.Event()
        self._etcd_targets: list[tuple[str, int]] | None = None
        self._guard_lock = asyncio.Lock()

    async def start(self) -> None:
        self.network = (await netconfig.load(self.ctx.store)).spec
        if self._config_reg is None:
            self._config_reg = self.configs.on_change(self._config_changed)
        self.ctx.informers.start()
        p = self.ctx.paths
        for d in (p.state_dir, p.netns_dir, p.cni_cache_dir):
            os.makedirs(d, exist_ok=True)
        self.saved = podstate.load_all(p.state_dir)
        # Build (or find) the native container shim now, not on the first pod's path.
        await asyncio.get_running_loop().run_in_executor(None, containers.native_shim)
        await self.learn_host_ip()

    async def learn_host_ip(self) -> None:
        """The node's address (pods' hostIP, and hostNetwork pods' IP)."""
        self.host_ip = self.host_ip or self.ctx.underlay_ip
        if self.host_ip is None:
            with contextlib.suppress(Exception):
                node = await self.ctx.store.get(Node, self.ctx.node_name)
                if node is not None:
                    self.host_ip = node.status.address("InternalIP")

    async def run(self) -> None:
        if self._pods_reg is None:  # once: run() is restarted after a failure
            self._pods_reg = self.pods.on_change(self._pod_changed)
            self._object_regs = [
                self.config_maps.on_change(self._object_changed),
                self.secrets.on_change(self._object_changed),
                self.namespaces.on_change(self._object_changed),
            ]
        self.ctx.informers.start()
        await self.pods.wait_synced()
        if not self._adopting_done.is_set():
            await self._adopt()
        while True:  # the informer and its handler do the rest; this repairs the etcd guard
            await self.sync_etcd_guard()
            await asyncio.sleep(GUARD_RESYNC_SECONDS)

    async def sync_etcd_guard(self) -> None:
        """Only this node's pods with credentials reach etcd (runtime/etcdguard.py)."""

        # The pods it runs, and (after a restart, before their workers exist) the pods
        # bound here as etcd has them: a restart must not cut a DNS pod off.
        def credentialed(p: Pod) -> bool:
            return p.namespace in credentials.SYSTEM_NAMESPACES and bool(credentials.wanted(p))

        allowed = {w.saved.pod_ip for w in self.workers.values() if credentialed(w.pod)}
        allowed |= {
            p.status.pod_ip
            for p in self.pods.by_index(BY_NODE, self.ctx.node_name)
            if credentialed(p) and p.status.phase == "Running"
        }
        allowed.discard(None)
        loop = asyncio.get_running_loop()
        async with self._guard_lock:
            try:
                if self._etcd_targets is None:
                    eps = getattr(self.ctx.store, "endpoints", [])
                    self._etcd_targets = await loop.run_in_executor(
                        None, etcdguard.etcd_targets, eps
                    )
                args = (self.ctx.options.netns, self.network.network, self._etcd_targets, allowed)
                if await loop.run_in_executor(None, etcdguard.sync, *args):
                    log.info(
                        "etcd guard: pods allowed to reach etcd: %s", sorted(allowed) or "none"
                    )
            except Exception as e:  # never stop pods for it; the next pass retries
                log.warning("etcd guard: %s: %s", type(e).__name__, e)

    async def _adopt(self) -> None:
        """Once, before any pod event is handled: tear down what no longer exists, GC CNI."""
        mine = {p.metadata.uid: p for p in self.pods.by_index(BY_NODE, self.ctx.node_name)}
        adopted = sum(uid in self.saved for uid in mine)
        for uid, s in list(self.saved.items()):
            if uid not in mine:
                await self._teardown_orphan(s)
        keep = {s.sandbox_id for s in self.saved.values() if s.sandbox_id}
        keep |= {w.saved.sandbox_id for w in self.workers.values() if w.saved.sandbox_id}
        # Only pod sandboxes: podman or ctr containers on this node share the cache dir.
        removed = await self.cni.gc(keep, ours=is_pod_sandbox)
        if removed:
            log.info("GC: removed %d CNI attachment(s) of pods that no longer exist", len(removed))
        self._adopting_done.set()
        log.info(
            "node %s: watching pods (%d here, %d adopted)", self.ctx.node_name, len(mine), adopted
        )

    async def _pod_changed(self, old: Pod | None, new: Pod | None) -> None:
        await self._adopting_done.wait()
        if new is None:
            assert old is not None
            uid = self.by_key.get(f"{old.namespace}/{old.name}")
            if uid and uid in self.workers:
                self.workers[uid].object_gone()
        else:
            self._handle(new)

    async def config_synced(self) -> None:
        """ConfigMaps, Secrets and Namespaces are known (a lookup before would miss them)."""
        await self.config_maps.wait_synced()
        await self.secrets.wait_synced()
        await self.namespaces.wait_synced()
        await self.services.wait_synced()

    def service_links(self, pod: Pod) -> dict[str, str]:
        """The Service variables kubelet gives a pod: the `kubernetes` Service's always,
        its namespace's Services too unless `enableServiceLinks: false`."""
        api = self.services.get("kubernetes", "default")
        chosen = [api] if api is not None else []
        if pod.spec.enable_service_links is not False:
            mine = sorted(
                (s for s in self.services.values() if s.namespace == pod.namespace),
                key=lambda s: s.name,
            )
            chosen = [s for s in chosen if pod.namespace != "default"] + mine
        return envvars.service_links(chosen)

    def config_map(self, ns: str, name: str) -> ConfigMap | None:
        return self.config_maps.get(name, ns)

    def secret(self, ns: str, name: str) -> Secret | None:
        return self.secrets.get(name, ns)

    def namespace_labels(self, ns: str) -> dict[str, str]:
        n = self.namespaces.get(ns)
        return dict(n.metadata.labels) if n is not None else {}

    def _object_changed(self, old: TypedObject | None, new: TypedObject | None) -> None:
        """A ConfigMap or Secret changed: the pods that use it refresh their volumes
        and retry containers waiting for it (CreateContainerConfigError)."""
        o = new or old
        if o is None:
            return
        for w in list(self.workers.values()):
            if isinstance(o, Namespace):  # its labels (hostPath volumes)
                if w.saved.namespace == o.name and w.pod.spec.volumes:
                    w.config_changed()
            elif w.saved.namespace == o.namespace and w.uses(type(o).KIND, o.name):
                w.config_changed()

    def _config_changed(self, old: NetworkConfig | None, new: NetworkConfig | None) -> None:
        if new is not None and new.name == netconfig.CONFIG_NAME and new.spec != self.network:
            self.network = new.spec

    def _mine(self, p: Pod) -> bool:
        return p.spec.node_name == self.ctx.node_name

    def ready(self) -> bool:
        """For /readyz: the pods are known and the node's leftovers adopted or removed."""
        return self.pods.has_synced and self._adopting_done.is_set()

    def debug_state(self) -> dict[str, Any]:
        """For the debug socket: the pods this node runs, and how far each got."""
        return {
            "pods": {
                f"{w.saved.namespace}/{w.saved.name}": {
                    "uid": uid,
                    "sandbox": w.saved.sandbox_id,
                    "netns": w.saved.netns,
                    "ip": w.saved.pod_ip,
                    "networkDown": w.saved.network_down,
                    "adopted": w.adopted,
                    "terminating": w.terminating,
                    "gone": w.gone,
                }
                for uid, w in sorted(self.workers.items())
            },
            "finished": len(self.finished),
        }

    def _handle(self, pod: Pod) -> None:
        uid = pod.metadata.uid or ""
        key = f"{pod.namespace}/{pod.name}"
        old = self.by_key.get(key)
        if old and old != uid and old in self.workers:
            self.workers[old].object_gone()  # same name, new object: the old pod is gone
        w = self.workers.get(uid)
        if w is not None:
            if self._mine(pod):
                w.update(pod)
            else:
                w.object_gone()
            return
        if not self._mine(pod) or uid in self.finished:
            return
        w = PodWorker(self, pod, self.saved.pop(uid, None))
        w.update(pod)
        self.workers[uid] = w
        self.by_key[key] = uid
        w.task = asyncio.create_task(self._run_worker(w, key))

    async def _run_worker(self, w: PodWorker, key: str) -> None:
        try:
            await w.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s: worker failed", key)
        finally:
            uid = w.saved.uid
            if self.workers.get(uid) is w and w.terminating:
                self.workers.pop(uid, None)
                self.finished[uid] = None
                while len(self.finished) > 10000:
                    self.finished.pop(next(iter(self.finished)))
                if self.by_key.get(key) == uid:
                    self.by_key.pop(key, None)
                if credentials.wanted(w.pod):  # its address may be another pod's next
                    await self.sync_etcd_guard()

    async def _teardown_orphan(self, s: PodSaved) -> None:
        """A pod we ran before a restart that no longer exists: stop and clean up."""
        log.info("pod %s/%s (%s) is gone: cleaning up", s.namespace, s.name, s.uid)
        for c in s.containers.values():
            if c.record:
                rec = containers.ContainerRecord.from_dict(c.record)
                await containers.stop(rec, None, 0)
        if s.sandbox_id:
            cached = self.cni.cache.get(s.network, s.sandbox_id, s.ifname)
            if cached is not None:
                try:
                    await self.cni.delete_cached(cached, s.netns)
                except CNIError as e:
                    log.warning("GC of %s/%s: CNI DEL failed: %s", s.namespace, s.name, e)
        loop = asyncio.get_running_loop()
        if s.netns:
            await loop.run_in_executor(None, netns.remove_pinned, s.netns)
        await loop.run_in_executor(None, PodCgroups(self.ctx.node_name, s.uid).remove)
        podstate.forget(self.ctx.paths.state_dir, s.uid)
        self.saved.pop(s.uid, None)

    async def stop(self) -> None:
        """Leave the pods running (a restarted runtime adopts them); just stop watching."""
        for reg in (self._pods_reg, self._config_reg, *self._object_regs):
            if reg is not None:
                reg.remove()
        self._pods_reg = self._config_reg = None
        self._object_regs = []
        tasks = [w.task for w in self.workers.values() if w.task is not None]
        for w in self.workers.values():
            for r in w.runners:
                if r.task is not None:
                    r.task.cancel()
                r._stop_probes(reset=False)  # still running: keep its readiness
            with contextlib.suppress(OSError):
                podstate.save(self.ctx.paths.state_dir, w.saved)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
