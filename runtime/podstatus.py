"""Status reporting: what a pod worker knows, written to its Pod object in etcd.

`PodStatusWriter.compute()` turns the worker's saved state into a `PodStatus`
(phase, conditions, container statuses) and the annotations `corral exec` and
`corral logs` read; `run()` writes it whenever the worker says something
changed, skipping writes that would change nothing, with a compare-and-swap on
the newest Pod object seen (no read first).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.api.objects import ContainerStatus as CStatus
from corral.api.objects import Pod, PodCondition, PodIP, PodStatus
from corral.api.store import Conflict, NotFound, now_iso
from corral.daemon import metrics

if TYPE_CHECKING:
    from corral.runtime.podworker import PodWorker

log = logging.getLogger(__name__)

ANN_CONTAINERS = "corral.dev/containers"  # {name: {pid, started, log}}: for exec/logs
ANN_RUNTIME = "corral.dev/runtime"  # {node, pid, podDir}: where the files are

# The startup timeline's stages, in order (PodWorker.stages); logged once Ready is written.
STAGES = (
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


def _rv(p: Pod) -> int:
    return int(p.metadata.resource_version or 0)


class PodStatusWriter:
    """Keeps one pod's status in etcd in step with its worker (`mark()` after a change)."""

    def __init__(self, worker: PodWorker, pod: Pod) -> None:
        self.w = worker
        self._dirty = asyncio.Event()
        self._base: Pod | None = None  # newest Pod object known: the writes' CAS base
        self._last_written: str | None = None
        # Transition times carry over from what is stored (e.g. across a runtime restart).
        self._cond_times: dict[str, tuple[str, str]] = {
            c.type: (c.status, c.last_transition_time)
            for c in pod.status.conditions
            if c.last_transition_time
        }

    def seen(self, pod: Pod) -> None:
        """A newer Pod object (watched): the base of the next compare-and-swap."""
        if self._base is None or _rv(pod) > _rv(self._base):
            self._base = pod

    def mark(self) -> None:
        """Something changed: write the status (once the writer gets to it)."""
        self._dirty.set()

    def compute(self) -> tuple[PodStatus, dict[str, str]]:
        """The worker's state as the Pod's status and the runtime's annotations."""
        w = self.w
        s = w.saved
        initialized, init_failed = w.initialized(), w.init_failed()
        # Not started yet: waiting, for the init containers to finish or to be created.
        pending = {"waiting": {"reason": "ContainerCreating" if initialized else "PodInitializing"}}
        init_statuses = []
        for r in w.init_runners:
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
        for r in w.runners:
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
        done = [r.saved.done for r in w.runners]
        if init_failed:
            phase = "Failed"
        elif not initialized:
            phase = "Pending"
        elif all(done):
            failed = any(
                r.saved.state.get("terminated", {}).get("exitCode", 0) != 0 for r in w.runners
            )
            phase = "Failed" if failed else "Succeeded"
        elif (
            all(
                r.saved.restart_count or r.saved.done or "running" in r.saved.state
                for r in w.runners
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
            host_ip=w.rt.host_ip,
            pod_ip=s.pod_ip,
            pod_ips=[PodIP(ip=s.pod_ip)] if s.pod_ip else [],
            start_time=s.start_time,
            conditions=conditions,
            init_container_statuses=init_statuses,
            container_statuses=statuses,
        )
        if w.sandbox_error is not None:
            status.reason, status.message = w.sandbox_error
        ann = {
            ANN_CONTAINERS: json.dumps(
                {
                    r.name: {"pid": r.rec.init_pid, "started": r.rec.init_started, "log": r.rec.log}
                    for r in w.all_runners
                    if r.rec is not None
                },
                sort_keys=True,
            ),
            ANN_RUNTIME: json.dumps(
                {
                    "node": w.rt.ctx.node_name,
                    "pid": os.getpid(),
                    "podDir": os.path.abspath(w.dir),
                },
                sort_keys=True,
            ),
        }
        return status, ann

    async def _put_status(self, change: Callable[[Pod], Pod | None]) -> None:
        """Compare-and-swap on the newest Pod seen (watched or written by us), without a
        read first; if it moved on meanwhile, read-modify-write as usual."""
        store, base, s = self.w.rt.ctx.store, self._base, self.w.saved
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
        self._base = await store.modify(Pod, s.name, s.namespace, change)

    def _log_startup(self, status: PodStatus, write_start: float) -> None:
        """Once, when Ready is first written: where the pod's startup time went."""
        st = self.w.stages
        if "write" in st or not any(
            c.type == "Ready" and c.status == "True" for c in status.conditions
        ):
            return
        st["to-write"], st["write"] = write_start, time.monotonic()
        order = [k for k in STAGES if k in st]
        parts = [f"{b} {(st[b] - st[a]) * 1000:.0f}" for a, b in itertools.pairwise(order)]
        metrics.POD_START_SECONDS.observe(st["write"] - st["seen"])
        for a, b in itertools.pairwise(order):
            metrics.POD_START_STAGE_SECONDS.labels(b).observe(st[b] - st[a])
        log.info(
            "pod %s/%s: Ready written %.0f ms after the runtime saw it (ms: %s)",
            self.w.saved.namespace,
            self.w.saved.name,
            (st["write"] - st["seen"]) * 1000,
            ", ".join(parts),
        )

    async def run(self) -> None:
        """Write the status each time it was marked changed, until the Pod is gone."""
        # The first write waits for the first change (usually the sandbox with its IP):
        # one etcd write less per pod, which counts when many pods start at once.
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            status, ann = self.compute()
            doc = json.dumps([status.dump(), ann], sort_keys=True)
            if doc == self._last_written:
                continue
            uid = self.w.saved.uid

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
                    "pod %s/%s: status write failed: %s",
                    self.w.saved.namespace,
                    self.w.saved.name,
                    e,
                )
                await asyncio.sleep(1)
                self._dirty.set()
