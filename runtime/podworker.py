"""PodWorker: one pod on this node, from its sandbox to its teardown.

The sandbox first: a pinned netns at <netns_dir>/cni-<id>, cgroups, CNI ADD,
resolv.conf and hosts (hostNetwork pods skip the netns and CNI). Then the init
containers in order, then one `ContainerRunner` per container. On a
deletionTimestamp: SIGTERM, grace, SIGKILL, CNI DEL, sandbox and cgroups
removed, then the Pod object is deleted (compare-and-swap). Its state is saved
under <state_dir>/pods/<uid>/ at every change, so a restarted runtime adopts
the pod; its status goes to etcd through its `PodStatusWriter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING

from corral.api.objects import Pod
from corral.api.store import Conflict, now_iso
from corral.cni.client import CNIError, RuntimeConf, load_conflist, pod_args, result_ips
from corral.node import mounts, netns
from corral.runtime import podstate, sandbox, security
from corral.runtime.cgroups import Limits, PodCgroups
from corral.runtime.containerrunner import MAX_BACKOFF, ContainerRunner
from corral.runtime.downward import PodFacts
from corral.runtime.podstate import ContainerSaved, PodSaved
from corral.runtime.podstatus import PodStatusWriter
from corral.runtime.volumes import PodVolumes, VolumeError, host_path_refusal, references

if TYPE_CHECKING:
    from corral.runtime.pods import PodRuntime

log = logging.getLogger(__name__)

SHM_BYTES = 64 << 20  # a pod's /dev/shm, as containerd's default


class PodWorker:
    """One pod bound to this node (`rt` is the node's PodRuntime)."""

    def __init__(self, rt: PodRuntime, pod: Pod, saved: PodSaved | None) -> None:
        self.rt, self.pod = rt, pod
        uid = pod.metadata.uid or ""
        self.adopted = saved is not None
        self.saved = saved or PodSaved(uid=uid, namespace=pod.namespace or "default", name=pod.name)
        for c in [*pod.spec.init_containers, *pod.spec.containers]:
            self.saved.containers.setdefault(c.name, ContainerSaved())
        self.dir = podstate.pod_dir(rt.ctx.paths.state_dir, uid)
        self.cgroups = PodCgroups(rt.ctx.node_name, uid)
        self.volumes = PodVolumes(self.dir, pod)
        # Set when a ConfigMap or Secret the pod uses changes (runtime/pods.py).
        self.config_event = asyncio.Event()
        self._refresher: asyncio.Task | None = None
        self._refresh_wanted = False
        self.volumes_ready = False  # set up (refreshes may rewrite them from then on)
        self.ipc_ready = False  # the pod's IPC namespace and /dev/shm exist
        self.host_network = pod.spec.host_network
        self.init_runners = [
            ContainerRunner(self, c, self.saved.containers[c.name], init=True)
            for c in pod.spec.init_containers
        ]
        self.runners = [
            ContainerRunner(self, c, self.saved.containers[c.name]) for c in pod.spec.containers
        ]
        self.deleting = asyncio.Event()
        self.gone = False  # the Pod object no longer exists
        self.terminating = False
        self.torn_down = False  # state forgotten: nothing may write it again
        self.sandbox_error: tuple[str, str] | None = None
        self.status = PodStatusWriter(self, pod)
        self.task: asyncio.Task | None = None
        self.writer: asyncio.Task | None = None
        self.stages: dict[str, float] = {"seen": time.monotonic()}  # startup timeline

    @property
    def hostname(self) -> str:
        if self.host_network:  # as in Kubernetes: the node's name
            return self.rt.ctx.node_name[:63].rstrip("-.")
        return (self.pod.spec.hostname or self.pod.name)[:63].rstrip("-.")

    @property
    def all_runners(self) -> list[ContainerRunner]:
        return [*self.init_runners, *self.runners]

    def init_failed(self) -> bool:
        """An init container failed for good (restartPolicy Never): the pod Failed."""
        return any(
            r.saved.done and r.saved.state.get("terminated", {}).get("exitCode", 0) != 0
            for r in self.init_runners
        )

    def initialized(self) -> bool:
        return all(
            r.saved.done and r.saved.state.get("terminated", {}).get("exitCode") == 0
            for r in self.init_runners
        )

    def grace(self) -> float:
        md = self.pod.metadata
        if md.deletion_grace_period_seconds is not None:
            return float(md.deletion_grace_period_seconds)
        return float(self.pod.spec.termination_grace_period_seconds)

    def update(self, pod: Pod) -> None:
        meta_changed = (pod.metadata.labels, pod.metadata.annotations) != (
            self.pod.metadata.labels,
            self.pod.metadata.annotations,
        )
        self.pod = self.volumes.pod = pod
        if meta_changed:  # downwardAPI files of labels and annotations
            self.config_changed()
        self.status.seen(pod)
        if pod.metadata.deletion_timestamp:
            self.deleting.set()

    # ------------------------------------------------------------ configuration

    def facts(self) -> PodFacts:
        return PodFacts(self.pod, self.rt.ctx.node_name, self.saved.pod_ip, self.rt.host_ip)

    def uses(self, kind: str, name: str) -> bool:
        """Whether a volume or a container's env refers to this ConfigMap or Secret."""
        return (kind, name) in references(self.pod)

    def config_changed(self) -> None:
        """Refresh the volumes soon; wake containers waiting for their config."""
        self.config_event.set()
        self._refresh_wanted = True
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_volumes())

    async def _refresh_volumes(self) -> None:
        """Rewrite the volumes until no change came in meanwhile (one writer at a time;
        only once _ensure_volumes has set them up)."""
        rt = self.rt
        while self._refresh_wanted and self.volumes_ready:
            self._refresh_wanted = False
            if self.torn_down or self.terminating:
                return
            await rt.config_synced()
            try:
                changed = await asyncio.get_running_loop().run_in_executor(
                    None, self.volumes.refresh, self.facts(), rt.config_map, rt.secret
                )
            except OSError as e:  # e.g. torn down meanwhile
                log.debug(
                    "pod %s/%s: volumes not refreshed: %s", self.saved.namespace, self.saved.name, e
                )
                return
            if changed:
                log.info(
                    "pod %s/%s: volumes %s updated", self.saved.namespace, self.saved.name, changed
                )

    async def _ensure_volumes(self) -> None:
        """Every volume set up, retried while a ConfigMap or Secret it needs is missing
        (the pod stays Pending with the reason, as FailedMount)."""
        if not self.pod.spec.volumes:
            self.volumes_ready = True
            return
        await self.rt.config_synced()
        podstate.ensure_dir(self.rt.ctx.paths.state_dir, self.saved.uid)
        loop = asyncio.get_running_loop()
        backoff = 0.5
        hidden = security.hidden_paths(self.rt.ctx.paths, getattr(self.rt.ctx.store, "tls", None))
        while not self.deleting.is_set():
            self.config_event.clear()
            try:
                why = host_path_refusal(
                    self.pod, self.rt.namespace_labels(self.saved.namespace), hidden
                )
                if why is not None:
                    raise VolumeError(why)
                await loop.run_in_executor(
                    None, self.volumes.setup, self.facts(), self.rt.config_map, self.rt.secret
                )
                self.volumes_ready = True
                if self._refresh_wanted:  # a change came while they were being set up
                    self.config_changed()
                if self.sandbox_error is not None:
                    self.sandbox_error = None
                    self.changed()
                return
            except (VolumeError, OSError) as e:
                self.sandbox_error = ("FailedMount", str(e))
                log.warning("pod %s/%s: %s", self.saved.namespace, self.saved.name, e)
                self.changed()
            waits = {
                asyncio.ensure_future(self.deleting.wait()),
                asyncio.ensure_future(self.config_event.wait()),
            }
            await asyncio.wait(waits, timeout=backoff, return_when=asyncio.FIRST_COMPLETED)
            for t in waits:
                t.cancel()
            backoff = min(backoff * 2, 30.0)

    @property
    def ipc_path(self) -> str:
        return os.path.join(self.dir, "ipc")

    @property
    def shm_path(self) -> str:
        return os.path.join(self.dir, "shm")

    def _ensure_ipc(self) -> None:
        """The pod's IPC namespace and /dev/shm, shared by its containers (the pause
        container's in Kubernetes): a pinned namespace and a 64 MiB tmpfs. Idempotent;
        without them (an error, logged) each container keeps IPC of its own."""
        try:
            podstate.ensure_dir(self.rt.ctx.paths.state_dir, self.saved.uid)
            if not mounts.is_mount(self.ipc_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.ipc_path)
                netns.create_pinned_ipc(self.ipc_path)
            os.makedirs(self.shm_path, exist_ok=True)
            if not mounts.is_mount(self.shm_path):
                mounts.mount_tmpfs(self.shm_path, SHM_BYTES, 0o1777)
            self.ipc_ready = True
        except OSError as e:
            log.warning("pod %s/%s: no shared IPC: %s", self.saved.namespace, self.saved.name, e)

    def _remove_ipc(self) -> None:
        netns.remove_pinned(self.ipc_path)
        mounts.unmount_under(self.shm_path)
        with contextlib.suppress(OSError):
            os.rmdir(self.shm_path)

    def object_gone(self) -> None:
        self.gone = True
        self.deleting.set()

    def persist(self) -> None:
        """Save the pod's state to disk (for adoption after a runtime restart)."""
        if not self.torn_down:
            with contextlib.suppress(OSError):
                podstate.save(self.rt.ctx.paths.state_dir, self.saved)

    def changed(self) -> None:
        """Persist, and have the status writer update the Pod object."""
        if self.torn_down:
            return
        self.persist()
        self.status.mark()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self.writer = asyncio.create_task(self.status.run())
        try:
            # Adopted after it completed (or after an init container failed for good).
            finished = all(r.saved.done for r in self.runners) or self.init_failed()
            if not self.deleting.is_set() and not finished:
                await asyncio.get_running_loop().run_in_executor(None, self._ensure_ipc)
                await self._ensure_volumes()  # before the sandbox, as the kubelet's order
            if not self.deleting.is_set() and not finished:
                await self._ensure_sandbox()
            started = not self.deleting.is_set() and not finished and self.sandbox_error is None
            if started and not await self._run_init():
                started = False
                if self.init_failed() and not self.deleting.is_set():
                    await self._network_down()  # the pod Failed: as for a finished pod
                    self.changed()
            if started:
                for r in self.runners:
                    r.task = asyncio.create_task(r.run())
                done = asyncio.gather(
                    *(r.task for r in self.runners if r.task), return_exceptions=True
                )
                deleting = asyncio.create_task(self.deleting.wait())
                await asyncio.wait({done, deleting}, return_when=asyncio.FIRST_COMPLETED)
                if done.done() and not self.deleting.is_set():
                    # Every container finished for good (restartPolicy Never/OnFailure):
                    # release the network as the kubelet does; keep the pod for its status.
                    await self._network_down()
                    self.changed()
                # Otherwise the runners see the deletion and end once terminate() stops
                # their containers.
            await self.deleting.wait()
            await self.terminate()
        finally:
            if self.writer is not None:
                self.writer.cancel()

    async def _run_init(self) -> bool:
        """The init containers, in order, each until it exits 0. False if the pod is
        being deleted or an init container failed for good (restartPolicy Never)."""
        for r in self.init_runners:
            backoff = self.rt.backoff_base
            while not (r.saved.done and r.saved.state.get("terminated", {}).get("exitCode") == 0):
                r.task = asyncio.create_task(r.run())
                deleting = asyncio.create_task(self.deleting.wait())
                await asyncio.wait({r.task, deleting}, return_when=asyncio.FIRST_COMPLETED)
                deleting.cancel()
                if self.deleting.is_set() or self.init_failed():
                    return False
                if r.task.done() and r.task.exception() is not None:  # a runtime bug: retry
                    log.error(
                        "pod %s/%s: init container %s: %r",
                        self.saved.namespace,
                        self.saved.name,
                        r.name,
                        r.task.exception(),
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.deleting.wait(), backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
            self.changed()
        return True

    async def _ensure_sandbox(self) -> None:
        s = self.saved
        if self.host_network:
            await self._host_sandbox()
            return
        if self.adopted and s.netns and netns.exists(s.netns) and not s.network_down:
            self._write_files()
            return
        if self.adopted and s.netns:
            await self._network_down()
        backoff = 0.5
        while not self.deleting.is_set():
            try:
                await self._setup_sandbox()
                if self.sandbox_error is not None:
                    self.sandbox_error = None
                    self.changed()  # take the failure reason off the pod
                else:
                    # The containers start next, and their status write carries the IP
                    # too: one etcd write less per pod when many start at once.
                    self.persist()
                return
            except Exception as e:  # any failure: report it on the pod and retry
                reason = (
                    "NetworkPluginNotReady"
                    if isinstance(e, CNIError) and e.code == 6
                    else "FailedCreatePodSandBox"
                )
                self.sandbox_error = (reason, str(e))
                log.warning("pod %s/%s: %s: %s", s.namespace, s.name, reason, e)
                self.changed()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.deleting.wait(), backoff)
                backoff = min(backoff * 2, 30.0)
        self.sandbox_error = None

    def _create_cgroups(self) -> None:
        spec = self.pod.spec
        self.cgroups.create(
            {c.name: Limits.of(c) for c in spec.containers},
            {c.name: Limits.of(c) for c in spec.init_containers},
        )

    async def _host_sandbox(self) -> None:
        """hostNetwork: no netns, no CNI; the pod's IP is its node's (retried like a
        sandbox until the node's address is known)."""
        s, ctx = self.saved, self.rt.ctx
        backoff = 0.5
        while self.rt.host_ip is None and not self.deleting.is_set():
            self.sandbox_error = ("FailedCreatePodSandBox", "the node has no InternalIP yet")
            self.changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.deleting.wait(), backoff)
            backoff = min(backoff * 2, 30.0)
            await self.rt.learn_host_ip()
        if self.deleting.is_set():
            return
        self.sandbox_error = None
        if not self.adopted:
            await asyncio.get_running_loop().run_in_executor(None, self._create_cgroups)
        s.sandbox_id, s.netns, s.network_down = "", "", False
        s.pod_ip, s.start_time = self.rt.host_ip, s.start_time or now_iso()
        podstate.save(ctx.paths.state_dir, s)
        self._write_files()
        self.changed()

    async def _setup_sandbox(self) -> None:
        s, ctx = self.saved, self.rt.ctx
        loop = asyncio.get_running_loop()
        self.stages["to-sandbox"] = time.monotonic()
        net = load_conflist(ctx.paths.cni_conf_dir)
        await loop.run_in_executor(None, self._create_cgroups)
        s.sandbox_id = secrets.token_hex(32)
        s.netns = sandbox.new_netns_path(ctx.paths.netns_dir)
        s.network, s.network_down = net.name, False
        s.start_time = s.start_time or now_iso()
        podstate.save(ctx.paths.state_dir, s)  # before ADD, so a crash can GC it
        t0 = self.stages["cgroups"] = time.monotonic()
        await loop.run_in_executor(None, netns.create_pinned, s.netns)
        t1 = self.stages["netns"] = time.monotonic()
        try:
            async with self.rt.cni_slots:
                t2 = self.stages["cni-wait"] = time.monotonic()
                result = await self.rt.cni.add(net, self._runtime_conf())
        except BaseException:
            await loop.run_in_executor(None, netns.remove_pinned, s.netns)
            s.netns = ""
            raise
        ips = result_ips(result)
        s.pod_ip = ips[0] if ips else None
        await loop.run_in_executor(None, self.cgroups.register_ip, s.pod_ip)  # eBPF proxy
        self.stages["cni-add"] = time.monotonic()
        self._write_files()
        log.info(
            "pod %s/%s: sandbox %s, netns %.0f ms, CNI ADD %.0f ms (%.0f ms queued), IP %s",
            s.namespace,
            s.name,
            s.sandbox_id[:12],
            (t1 - t0) * 1000,
            (time.monotonic() - t2) * 1000,
            (t2 - t1) * 1000,
            s.pod_ip,
        )

    def _runtime_conf(self) -> RuntimeConf:
        s = self.saved
        return RuntimeConf(
            container_id=s.sandbox_id,
            netns=s.netns,
            ifname=s.ifname,
            args=pod_args(s.namespace, s.name, s.uid, s.sandbox_id),
        )

    def _write_files(self) -> None:
        net, p = self.rt.network, self.pod
        etc = os.path.join(self.dir, "etc")
        os.makedirs(etc, exist_ok=True)
        ns = p.namespace or "default"
        policy = p.spec.dns_policy
        if self.host_network and policy == "ClusterFirst":
            policy = "Default"  # as the kubelet: ClusterFirstWithHostNet asks for cluster DNS
        files = {
            "resolv.conf": sandbox.resolv_conf(ns, net.cluster_dns, net.cluster_domain, policy),
            "hosts": sandbox.etc_hosts(
                self.saved.pod_ip, self.hostname, p.spec.subdomain, ns, net.cluster_domain
            ),
        }
        for name, text in files.items():
            with open(os.path.join(etc, name), "w") as f:
                f.write(text)

    async def _network_down(self) -> None:
        """CNI DEL and remove the netns (idempotent; errors are logged, not fatal)."""
        s = self.saved
        if s.sandbox_id:
            cached = self.rt.cni.cache.get(s.network, s.sandbox_id, s.ifname)
            try:
                if cached is not None:
                    await self.rt.cni.delete_cached(cached, s.netns if s.netns else "")
            except CNIError as e:
                log.warning("pod %s/%s: CNI DEL failed: %s", s.namespace, s.name, e)
        if s.netns:
            await asyncio.get_running_loop().run_in_executor(None, netns.remove_pinned, s.netns)
        s.network_down = True

    async def terminate(self) -> None:
        """Graceful stop: SIGTERM, grace, SIGKILL, CNI DEL, sandbox and cgroups gone, delete."""
        self.terminating = True
        self.changed()
        grace = self.grace()
        await asyncio.gather(*(r.stop(grace) for r in self.all_runners))
        for r in self.all_runners:
            if r.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(r.task, 15)
        await self._network_down()
        await asyncio.get_running_loop().run_in_executor(None, self.cgroups.remove)
        # Secrets' tmpfs unmounted, emptyDirs removed: with the pod, as the kubelet does.
        await asyncio.get_running_loop().run_in_executor(None, self.volumes.teardown)
        await asyncio.get_running_loop().run_in_executor(None, self._remove_ipc)
        if self.writer is not None:
            self.writer.cancel()
        # Everything on the node is gone before the object is: whoever waits for the
        # delete can rely on it (and a crash here just repeats an idempotent teardown).
        self.torn_down = True
        podstate.forget(self.rt.ctx.paths.state_dir, self.saved.uid)
        if not self.gone:
            await self._delete_object()

    async def _delete_object(self) -> None:
        store, s = self.rt.ctx.store, self.saved
        for _ in range(20):
            cur = await store.get(Pod, s.name, s.namespace)
            if cur is None or cur.metadata.uid != s.uid:
                return
            try:
                if cur.metadata.finalizers:  # kubelet's grace-0 delete: the last finalizer's
                    if cur.metadata.deletion_grace_period_seconds != 0:  # remover ends it
                        cur.metadata.deletion_grace_period_seconds = 0
                        cur.metadata.deletion_timestamp = (
                            cur.metadata.deletion_timestamp or now_iso()
                        )
                        await store.update(cur)
                    return
                await store.delete(Pod, s.name, s.namespace, cur.metadata.resource_version)
                return
            except Conflict:
                await asyncio.sleep(0.01)
        log.warning("pod %s/%s: could not delete the object (kept changing)", s.namespace, s.name)
