"""ContainerRunner: one container of a pod, from launch to its last exit.

It launches the container through the shim (runtime/containers.py), watches it
until it exits, applies the restart policy with a doubling back-off, runs its
startup, readiness and liveness probes, and stops it the kubelet's way (preStop
hook, SIGTERM, SIGKILL once the grace period is over). What it learns goes into
its `ContainerSaved` record and the worker is told (`changed()`): the pod
worker persists it and the status writer reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from corral.api.objects import Container, Probe
from corral.api.store import now_iso
from corral.runtime import containers, corralfiles, credentials, envvars, probes, security
from corral.runtime.podstate import ContainerSaved
from corral.runtime.volumes import VolumeError

if TYPE_CHECKING:
    from corral.runtime.podworker import PodWorker

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0  # restart back-off doubles up to this (the kubelet's 5 minutes)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerRunner:
    """One container of `worker`'s pod (an init container runs to completion first)."""

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
        # The environment the container was last started with (exec probes get it too).
        self.last_env: dict[str, str] = {e.name: e.value for e in spec.env if e.value_from is None}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ready(self) -> bool:
        return self.saved.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.saved.ready = value

    def argv(self) -> list[str]:
        return [*self.spec.command, *self.spec.args]

    async def run(self) -> None:
        w, s = self.w, self.saved
        if s.done:
            return
        backoff, config_backoff = w.rt.backoff_base, 1.0
        while not (w.terminating or w.deleting.is_set()):
            if self.rec is None:
                try:
                    env, volumes = await self._config()
                except envvars.ConfigError as e:
                    # The kubelet's CreateContainerConfigError: no restart is counted;
                    # retried when a ConfigMap or Secret changes, or after a while.
                    s.state = {
                        "waiting": {"reason": "CreateContainerConfigError", "message": str(e)}
                    }
                    w.changed()
                    waits = {
                        asyncio.ensure_future(w.deleting.wait()),
                        asyncio.ensure_future(w.config_event.wait()),
                    }
                    await asyncio.wait(
                        waits, timeout=config_backoff, return_when=asyncio.FIRST_COMPLETED
                    )
                    for t in waits:
                        t.cancel()
                    config_backoff = min(config_backoff * 2, 10.0)
                    continue
                try:
                    w.stages.setdefault("to-launch", time.monotonic())
                    self.rec, self.proc = await self._launch(env, volumes)
                    self.last_env = env
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

    async def _config(self) -> tuple[dict[str, str], list[tuple[str, str, bool]]]:
        """The container's environment and volume mounts (envvars.ConfigError if a
        ConfigMap, Secret or key it needs is missing, or a subPath is not usable)."""
        w = self.w
        await w.rt.config_synced()
        w.config_event.clear()
        links = w.rt.service_links(w.pod)
        env = envvars.environment(self.spec, w.facts(), w.rt.config_map, w.rt.secret, links)
        try:
            mounts = w.volumes.mounts(self.spec)
        except (VolumeError, OSError) as e:
            raise envvars.ConfigError(str(e)) from None
        return env, mounts

    async def _launch(
        self, env: dict[str, str], volumes: list[tuple[str, str, bool]]
    ) -> tuple[containers.ContainerRecord, asyncio.subprocess.Process]:
        w = self.w
        argv = [envvars.expand(a, env) for a in self.argv()]  # $(VAR) in command and args
        if not argv:
            raise containers.StartError(
                "no command: corral has no image entrypoints; set command or args"
            )
        hidden = security.hidden_paths(w.rt.ctx.paths, getattr(w.rt.ctx.store, "tls", None))
        try:
            sec = security.for_container(w.pod, self.spec, hidden)
            mounts = credentials.mounts(w.pod, w.rt.ctx.paths.credentials_dir)
            code = corralfiles.mounts(w.pod, sec, hidden, image=bool(self.spec.image))
        except (
            security.SecurityError,
            credentials.CredentialsError,
            corralfiles.CorralFilesError,
        ) as e:
            raise containers.StartError(str(e)) from None
        if mounts:  # its address may reach etcd before its first process runs
            await w.rt.sync_etcd_guard()
        if w.ipc_ready and not sec.privileged:  # the pod's shared /dev/shm
            volumes = [*volumes, (w.shm_path, "/dev/shm", False)]
        return await containers.launch(
            w.dir,
            self.name,
            self.saved.restart_count,
            argv=argv,
            env=env,
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
            exec_mounts=code,
            volumes=volumes,
            ipcns=w.ipc_path if w.ipc_ready else None,
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
                {"PATH": containers.DEFAULT_PATH, **self.last_env},
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
