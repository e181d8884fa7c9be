"""PodRuntime: the node component that runs the pods bound to this node (kubelet-like).

Per pod, a `PodWorker`: sandbox netns at <netns_dir>/cni-<uuid> -> CNI ADD ->
resolv.conf and hosts -> cgroups -> one `ContainerRunner` per container (start,
probes, restart policy with backoff) -> status written to etcd. On a
deletionTimestamp: SIGTERM, grace, SIGKILL, CNI DEL, sandbox removed, then the
Pod object is deleted (compare-and-swap). State lives under
<state_dir>/pods/<uid>/ so a restarted runtime adopts running pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from corral.api import netconfig
from corral.api.informer import BY_NODE, Informer, Registration, by_node
from corral.api.objects import (
    Container,
    NetworkConfig,
    NetworkSpec,
    Node,
    Pod,
    PodCondition,
    PodIP,
    PodStatus,
    Probe,
)
from corral.api.objects import ContainerStatus as CStatus
from corral.api.store import Conflict, NotFound, now_iso
from corral.cni.client import (
    CNIClient,
    CNIError,
    RuntimeConf,
    is_pod_sandbox,
    load_conflist,
    pod_args,
    result_ips,
)
from corral.daemon import metrics
from corral.daemon.nodecontext import NodeContext
from corral.node import netns
from corral.runtime import (
    containers,
    credentials,
    etcdguard,
    podstate,
    probes,
    sandbox,
    security,
)
from corral.runtime.cgroups import Limits, PodCgroups
from corral.runtime.podstate import ContainerSaved, PodSaved

log = logging.getLogger(__name__)

ANN_CONTAINERS = "corral.dev/containers"  # {name: {pid, started, log}}: for exec/logs
ANN_RUNTIME = "corral.dev/runtime"  # {node, pid, podDir}: where the files are
MAX_BACKOFF = 300.0
GUARD_RESYNC_SECONDS = 30.0  # how often the etcd guard is checked and repaired


def _rv(p: Pod) -> int:
    return int(p.metadata.resource_version or 0)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerRunner:
    def __init__(
        self, worker: PodWorker, spec: Container, saved: ContainerSaved, init: bool = False
    ) -> None:
        self.w, self.spec, self.saved = worker, spec, saved
        self.init = init  # an init container: runs to completion before the others
        self.rec = containers.ContainerRecord.from_dict(saved.record) if saved.record else None
        self.proc: asyncio.subprocess.Process | None = None
        self.adopting = self.rec is not None  # found running after a runtime restart
        self.task: asyncio.Task | None = None
        self._probe_tasks: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ready(self) -> bool:
        return self.saved.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.saved.ready = value

    def env(self) -> dict[str, str]:
        return {e.name: e.value for e in self.spec.env}

    def argv(self) -> list[str]:
        return [*self.spec.command, *self.spec.args]

    async def run(self) -> None:
        w, s = self.w, self.saved
        if s.done:
            return
        backoff = w.rt.backoff_base
        while not (w.terminating or w.deleting.is_set()):
            if self.rec is None:
                try:
                    w.stages.setdefault("to-launch", time.monotonic())
                    self.rec, self.proc = await self._launch()
                    w.stages.setdefault("shim", time.monotonic())
                except containers.StartError as e:
                    s.state = {"waiting": {"reason": "RunContainerError", "message": str(e)}}
                    w.changed()
            if self.rec is not None:
                term, exit_code, ran = await self._run_once(self.rec)
            else:
                term = {
                    "exitCode": 128,
                    "reason": "ContainerCannotRun",
                    "message": s.state.get("waiting", {}).get("message", ""),
                    "startedAt": now_iso(),
                    "finishedAt": now_iso(),
                }
                exit_code, ran = 128, 0.0
            if w.terminating or w.deleting.is_set():
                s.state = {"terminated": term}
                w.changed()
                return
            policy = w.pod.spec.restart_policy
            if self.init:  # restarted until it succeeds, unless the pod never restarts
                policy = "Never" if policy == "Never" else "OnFailure"
            if policy == "Never" or (policy == "OnFailure" and exit_code == 0):
                s.state, s.done = {"terminated": term}, True
                w.changed()
                return
            s.last_state, s.restart_count = {"terminated": term}, s.restart_count + 1
            if ran > 600:
                backoff = w.rt.backoff_base
            s.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {backoff:g}s restarting failed "
                    f"container={self.name} pod={w.pod.name}",
                }
            }
            w.changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.deleting.wait(), backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _run_once(self, rec: containers.ContainerRecord) -> tuple[dict[str, Any], int, float]:
        """Watch one running instance until it exits; its `terminated` state."""
        w, s = self.w, self.saved
        s.record, s.started = rec.to_dict(), s.started or self.spec.startup_probe is None
        s.state = {"running": {"startedAt": _iso(rec.started_at)}}
        w.changed()
        self._start_probes(rec)
        if w.deleting.is_set():  # deleted while it was starting: stop it right away
            self._spawn(self._kill(rec))
        rc = await containers.wait_exit(rec, self.proc)
        self._stop_probes()
        ex = containers.exit_info(w.dir, self.name, rec, rc)
        ooms = w.cgroups.oom_kills(self.name)
        if ooms > s.oom_seen:
            reason = "OOMKilled"
        elif ex.exit_code == 0:
            reason = "Completed"
        else:
            reason = "Error"
        s.oom_seen = ooms
        term: dict[str, Any] = {
            "exitCode": ex.exit_code,
            "reason": reason,
            "startedAt": _iso(ex.started_at),
            "finishedAt": _iso(ex.finished_at),
        }
        if ex.signal:
            term["signal"] = ex.signal
        self.rec, self.proc, s.record = None, None, None
        return term, ex.exit_code, ex.finished_at - ex.started_at

    async def _launch(self) -> tuple[containers.ContainerRecord, asyncio.subprocess.Process]:
        w = self.w
        argv = self.argv()
        if not argv:
            raise containers.StartError(
                "no command: corral has no image entrypoints; set command or args"
            )
        hidden = security.hidden_paths(w.rt.ctx.paths, getattr(w.rt.ctx.store, "tls", None))
        try:
            sec = security.for_container(w.pod, self.spec, hidden)
            mounts = credentials.mounts(w.pod, w.rt.ctx.paths.credentials_dir)
        except (security.SecurityError, credentials.CredentialsError) as e:
            raise containers.StartError(str(e)) from None
        if mounts:  # its address may reach etcd before its first process runs
            await w.rt.sync_etcd_guard()
        return await containers.launch(
            w.dir,
            self.name,
            self.saved.restart_count,
            argv=argv,
            env=self.env(),
            working_dir=self.spec.working_dir,
            # hostNetwork: the shim "enters" its own namespace, the node's.
            netns=w.saved.netns or "/proc/self/ns/net",
            hostname=w.hostname,
            binds=[
                (os.path.join(w.dir, "etc", "resolv.conf"), "/etc/resolv.conf"),
                (os.path.join(w.dir, "etc", "hosts"), "/etc/hosts"),
            ],
            cgroups=w.cgroups.procs_files(self.name),
            image=self.spec.image or None,
            security=sec,
            mounts=mounts,
        )

    def _start_probes(self, rec: containers.ContainerRecord) -> None:
        # An adopted container keeps its readiness until a probe says otherwise, so a
        # runtime restart does not flap the pod out of its services' endpoints.
        resume, self.adopting = self.adopting, False
        if not resume or self.spec.readiness_probe is None:
            self.ready = self.spec.readiness_probe is None
        self._probe_tasks = [asyncio.create_task(self._probes(rec, resume))]

    def _stop_probes(self, reset: bool = True) -> None:
        """Stop probing; `reset` (the container ended) also marks it not ready."""
        for t in self._probe_tasks:
            t.cancel()
        self._probe_tasks = []
        if reset:
            self.ready = False
            self.w.changed()

    def _handler(self, probe: Any, rec: containers.ContainerRecord) -> probes.Handler:
        try:
            return probes.handler_for(
                probe,
                self.spec,
                self.w.saved.pod_ip or "127.0.0.1",
                lambda cmd: containers.exec_argv(self.w.dir, self.name, rec.init_pid, cmd),
                {"PATH": containers.DEFAULT_PATH, **self.env()},
            )
        except ValueError as e:  # e.g. a named port the container does not declare
            msg = str(e)

            async def broken() -> tuple[bool, str]:
                return False, msg

            return broken

    async def _probes(self, rec: containers.ContainerRecord, resume: bool = False) -> None:
        sp = self.spec
        if sp.startup_probe is not None and not (resume and self.saved.started):
            self.saved.started = False
            up = asyncio.Event()

            def on_startup(ok: bool, msg: str) -> None:
                if ok:
                    up.set()
                else:
                    log.info("%s/%s: startup probe failed: %s", self.w.pod.name, self.name, msg)
                    self._spawn(self._kill(rec))

            loop = probes.ProbeLoop(
                sp.startup_probe, self._handler(sp.startup_probe, rec), on_startup
            )
            t = asyncio.create_task(loop.run())
            try:
                await up.wait()
            finally:
                t.cancel()
        self.saved.started = True
        self.w.changed()
        tasks = []
        if sp.readiness_probe is not None:

            def on_ready(ok: bool, msg: str) -> None:
                self.ready = ok
                if not ok:
                    log.info("%s/%s: readiness probe failed: %s", self.w.pod.name, self.name, msg)
                self.w.changed()

            tasks.append(
                probes.ProbeLoop(
                    sp.readiness_probe,
                    self._handler(sp.readiness_probe, rec),
                    on_ready,
                    initial=self.ready,
                    resume=resume,
                ).run()
            )
        if sp.liveness_probe is not None:

            def on_live(ok: bool, msg: str) -> None:
                if not ok:
                    log.info(
                        "%s/%s: liveness probe failed, restarting: %s",
                        self.w.pod.name,
                        self.name,
                        msg,
                    )
                    self._spawn(self._kill(rec))

            tasks.append(
                probes.ProbeLoop(
                    sp.liveness_probe,
                    self._handler(sp.liveness_probe, rec),
                    on_live,
                    initial=True,
                    resume=resume,
                ).run()
            )
        if tasks:
            await asyncio.gather(*tasks)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _kill(self, rec: containers.ContainerRecord) -> None:
        await self._stop(rec, self.proc if self.rec is rec else None, self.w.grace())

    async def stop(self, grace: float) -> None:
        rec = self.rec
        if rec is not None:
            await self._stop(rec, self.proc, grace)

    async def _stop(
        self, rec: containers.ContainerRecord, proc: asyncio.subprocess.Process | None, grace: float
    ) -> None:
        """The kubelet's order: preStop (within the grace period), SIGTERM, then SIGKILL
        when the grace period is over. A preStop hook that uses it all up leaves the
        container 2 s after SIGTERM, as the kubelet does."""
        deadline = time.monotonic() + grace
        hook = self.spec.lifecycle.pre_stop if self.spec.lifecycle else None
        if hook is not None and grace > 0 and rec.alive():
            await self._pre_stop(rec, hook, grace)
        left = max(deadline - time.monotonic(), 2.0 if hook is not None and grace > 0 else 0.0)
        await containers.stop(rec, proc, left)

    async def _pre_stop(self, rec: containers.ContainerRecord, hook: Any, grace: float) -> None:
        w = self.w
        probe = Probe(exec=hook.exec, http_get=hook.http_get, timeout_seconds=max(1, int(grace)))
        t0 = time.monotonic()
        try:
            # The handler's own timeout ends the hook's process; this one is a backstop.
            ok, msg = await asyncio.wait_for(self._handler(probe, rec)(), grace + 1)
        except TimeoutError:
            ok, msg = False, f"still running after the grace period ({grace:g}s)"
        except Exception as e:  # a broken hook must not keep the container from stopping
            ok, msg = False, str(e)
        log.info(
            "%s/%s: preStop hook %s in %.0f ms%s",
            w.pod.name,
            self.name,
            "done" if ok else "failed",
            (time.monotonic() - t0) * 1000,
            "" if ok else f": {msg}",
        )


class PodWorker:
    def __init__(self, rt: PodRuntime, pod: Pod, saved: PodSaved | None) -> None:
        self.rt, self.pod = rt, pod
        uid = pod.metadata.uid or ""
        self.adopted = saved is not None
        self.saved = saved or PodSaved(uid=uid, namespace=pod.namespace or "default", name=pod.name)
        for c in [*pod.spec.init_containers, *pod.spec.containers]:
            self.saved.containers.setdefault(c.name, ContainerSaved())
        self.dir = podstate.pod_dir(rt.ctx.paths.state_dir, uid)
        self.cgroups = PodCgroups(rt.ctx.node_name, uid)
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
        self._dirty = asyncio.Event()
        self._base: Pod | None = None  # newest Pod object known: the status writes' CAS base
        self._last_written: str | None = None
        # Transition times carry over from what is stored (e.g. across a runtime restart).
        self._cond_times: dict[str, tuple[str, str]] = {
            c.type: (c.status, c.last_transition_time)
            for c in pod.status.conditions
            if c.last_transition_time
        }
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
        self.pod = pod
        if self._base is None or _rv(pod) > _rv(self._base):
            self._base = pod
        if pod.metadata.deletion_timestamp:
            self.deleting.set()

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
        self._dirty.set()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        self.writer = asyncio.create_task(self._write_status_loop())
        try:
            # Adopted after it completed (or after an init container failed for good).
            finished = all(r.saved.done for r in self.runners) or self.init_failed()
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
                await store.delete(Pod, s.name, s.namespace, cur.metadata.resource_version)
                return
            except Conflict:
                await asyncio.sleep(0.01)
        log.warning("pod %s/%s: could not delete the object (kept changing)", s.namespace, s.name)

    # ------------------------------------------------------------ status

    def compute_status(self) -> tuple[PodStatus, dict[str, str]]:
        s = self.saved
        initialized, init_failed = self.initialized(), self.init_failed()
        # Not started yet: waiting, for the init containers to finish or to be created.
        pending = {"waiting": {"reason": "ContainerCreating" if initialized else "PodInitializing"}}
        init_statuses = []
        for r in self.init_runners:
            completed = r.saved.done and r.saved.state.get("terminated", {}).get("exitCode") == 0
            init_statuses.append(
                CStatus(
                    name=r.name,
                    ready=completed,
                    started="running" in r.saved.state,
                    restart_count=r.saved.restart_count,
                    state=r.saved.state or {"waiting": {"reason": "PodInitializing"}},
                    last_state=r.saved.last_state,
                )
            )
        statuses = []
        for r in self.runners:
            running = "running" in r.saved.state
            statuses.append(
                CStatus(
                    name=r.name,
                    ready=bool(running and r.ready and r.saved.started),
                    started=running and r.saved.started,
                    restart_count=r.saved.restart_count,
                    state=r.saved.state or pending,
                    last_state=r.saved.last_state,
                )
            )
        done = [r.saved.done for r in self.runners]
        if init_failed:
            phase = "Failed"
        elif not initialized:
            phase = "Pending"
        elif all(done):
            failed = any(
                r.saved.state.get("terminated", {}).get("exitCode", 0) != 0 for r in self.runners
            )
            phase = "Failed" if failed else "Succeeded"
        elif (
            all(
                r.saved.restart_count or r.saved.done or "running" in r.saved.state
                for r in self.runners
            )
            and s.pod_ip is not None
        ):
            phase = "Running"
        else:
            phase = "Pending"
        all_ready = all(c.ready for c in statuses) and phase == "Running"
        ready_reason = (
            None
            if all_ready
            else ("PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady")
        )
        conds = [
            ("PodScheduled", True, None),
            ("Initialized", initialized, None if initialized else "ContainersNotInitialized"),
            ("ContainersReady", all_ready, ready_reason),
            ("Ready", all_ready, ready_reason),
        ]
        conditions = []
        for typ, ok, reason in conds:
            st = "True" if ok else "False"
            prev = self._cond_times.get(typ)
            if prev is None or prev[0] != st:
                self._cond_times[typ] = (st, now_iso())
            conditions.append(
                PodCondition(
                    type=typ,
                    status=st,
                    reason=reason,
                    last_transition_time=self._cond_times[typ][1],
                )
            )
        status = PodStatus(
            phase=phase,
            host_ip=self.rt.host_ip,
            pod_ip=s.pod_ip,
            pod_ips=[PodIP(ip=s.pod_ip)] if s.pod_ip else [],
            start_time=s.start_time,
            conditions=conditions,
            init_container_statuses=init_statuses,
            container_statuses=statuses,
        )
        if self.sandbox_error is not None:
            status.reason, status.message = self.sandbox_error
        ann = {
            ANN_CONTAINERS: json.dumps(
                {
                    r.name: {"pid": r.rec.init_pid, "started": r.rec.init_started, "log": r.rec.log}
                    for r in self.all_runners
                    if r.rec is not None
                },
                sort_keys=True,
            ),
            ANN_RUNTIME: json.dumps(
                {
                    "node": self.rt.ctx.node_name,
                    "pid": os.getpid(),
                    "podDir": os.path.abspath(self.dir),
                },
                sort_keys=True,
            ),
        }
        return status, ann

    async def _put_status(self, change: Callable[[Pod], Pod | None]) -> None:
        """Compare-and-swap on the newest Pod seen (watched or written by us), without a
        read first; if it moved on meanwhile, read-modify-write as usual."""
        store, base = self.rt.ctx.store, self._base
        if base is not None:
            md = base.metadata
            p = base.model_copy(
                update={"metadata": md.model_copy(update={"annotations": dict(md.annotations)})}
            )
            new = change(p)
            if new is None:
                return
            with contextlib.suppress(Conflict):
                self._base = await store.update(new)
                return
        self._base = await store.modify(Pod, self.saved.name, self.saved.namespace, change)

    def _log_startup(self, status: PodStatus, write_start: float) -> None:
        """Once, when Ready is first written: where the pod's startup time went."""
        st = self.stages
        if "write" in st or not any(
            c.type == "Ready" and c.status == "True" for c in status.conditions
        ):
            return
        st["to-write"], st["write"] = write_start, time.monotonic()
        order = [
            k
            for k in (
                "seen",
                "to-sandbox",
                "cgroups",
                "netns",
                "cni-wait",
                "cni-add",
                "to-launch",
                "shim",
                "to-write",
                "write",
            )
            if k in st
        ]
        parts = [f"{b} {(st[b] - st[a]) * 1000:.0f}" for a, b in itertools.pairwise(order)]
        metrics.POD_START_SECONDS.observe(st["write"] - st["seen"])
        for a, b in itertools.pairwise(order):
            metrics.POD_START_STAGE_SECONDS.labels(b).observe(st[b] - st[a])
        log.info(
            "pod %s/%s: Ready written %.0f ms after the runtime saw it (ms: %s)",
            self.saved.namespace,
            self.saved.name,
            (st["write"] - st["seen"]) * 1000,
            ", ".join(parts),
        )

    async def _write_status_loop(self) -> None:
        # The first write waits for the first change (usually the sandbox with its IP):
        # one etcd write less per pod, which counts when many pods start at once.
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            status, ann = self.compute_status()
            doc = json.dumps([status.dump(), ann], sort_keys=True)
            if doc == self._last_written:
                continue
            uid = self.saved.uid

            def change(
                p: Pod, status: PodStatus = status, ann: dict = ann, uid: str = uid
            ) -> Pod | None:
                if p.metadata.uid != uid:
                    return None
                p.status = status
                p.metadata.annotations.update(ann)
                return p

            try:
                t = time.monotonic()
                await self._put_status(change)
                self._last_written = doc
                self._log_startup(status, t)
            except NotFound:
                return
            except Exception as e:  # etcd hiccup: retry soon, never die
                log.warning(
                    "pod %s/%s: status write failed: %s", self.saved.namespace, self.saved.name, e
                )
                await asyncio.sleep(1)
                self._dirty.set()


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
        for reg in (self._pods_reg, self._config_reg):
            if reg is not None:
                reg.remove()
        self._pods_reg = self._config_reg = None
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

    async def stop_all_pods(self, timeout: float = 60.0) -> None:
        """Terminate every pod on this node (for tests and node drain), without deleting
        the Pod objects."""
        ws = list(self.workers.values())
        for w in ws:
            w.gone = True
            w.deleting.set()
        tasks = [w.task for w in ws if w.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
