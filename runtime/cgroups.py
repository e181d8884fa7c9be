"""Pod cgroups under a corral-owned subtree per node; never the root's own settings.

Layout (hybrid hierarchy, as on this machine):
    /sys/fs/cgroup/<memory|cpu|pids>/corral/<node>/<pod-uid>/<container>   v1 limits
    /sys/fs/cgroup/unified/corral/<node>/pods/<pod-uid>                     cgroup2 dir
Every process of the pod joins its cgroup2 directory (the container shim writes
itself into each `cgroup.procs`), which is what the eBPF proxy's programs and
its pod_cgroups map key on; no controller file is written there. Limits go to
the v1 controllers only: memory.limit_in_bytes (and memsw, where swap is
accounted), cpu.shares and the CFS quota; pids gets a directory but no limit.
On a machine whose memory and cpu controllers are on cgroup2 (no v1
hierarchy), pods run without limits (docs/runtime.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass

from corral.api.objects import Container
from corral.api.quantity import cpu_millis, memory_bytes
from corral.node.cgroups import CGROUP_ROOT, node_unified_dir, unified_root

log = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000


@dataclass
class Limits:
    memory: int | None = None  # bytes
    cpu_quota_millis: int | None = None
    cpu_shares: int = 2

    @classmethod
    def of(cls, c: Container) -> Limits:
        lim, req = c.resources.limits, c.resources.requests
        mem = memory_bytes(lim["memory"]) if "memory" in lim else None
        cpu = cpu_millis(lim["cpu"]) if "cpu" in lim else None
        req_cpu = cpu_millis(req["cpu"]) if "cpu" in req else cpu
        shares = max(2, (req_cpu or 0) * 1024 // 1000)
        return cls(memory=mem, cpu_quota_millis=cpu, cpu_shares=shares)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class PodCgroups:
    def __init__(self, node: str, pod_uid: str, root: str = CGROUP_ROOT) -> None:
        self.node, self.uid, self.root = node, pod_uid, root

    def v1_dir(self, ctrl: str, container: str | None = None) -> str:
        d = os.path.join(self.root, ctrl, "corral", self.node, self.uid)
        return os.path.join(d, container) if container else d

    @property
    def v2_dir(self) -> str:
        return os.path.join(node_unified_dir(self.node, self.root), "pods", self.uid)

    def _controllers(self) -> list[str]:
        return [c for c in V1_CONTROLLERS if os.path.isdir(os.path.join(self.root, c))]

    def create(self, limits: dict[str, Limits], init: dict[str, Limits] | None = None) -> None:
        """Make the pod's dirs (idempotent) and apply each container's limits.

        The pod's memory limit is the sum of its containers' (when each has one), or the
        largest init container's if that is more: init containers run one at a time,
        before the others (Kubernetes' effective pod limit)."""
        os.makedirs(self.v2_dir, exist_ok=True)
        app = limits
        limits = {**(init or {}), **limits}
        for ctrl in self._controllers():
            for name in limits:
                os.makedirs(self.v1_dir(ctrl, name), exist_ok=True)
        mems = [lim.memory for lim in app.values()]
        init_mems = [lim.memory for lim in (init or {}).values()]
        if "memory" in self._controllers():
            if mems and all(m is not None for m in [*mems, *init_mems]):
                total = max([sum(m for m in mems if m is not None), *init_mems])  # type: ignore[type-var]
                _write(os.path.join(self.v1_dir("memory"), "memory.limit_in_bytes"), str(total))
            for name, lim in limits.items():
                if lim.memory is not None:
                    d = self.v1_dir("memory", name)
                    _write(os.path.join(d, "memory.limit_in_bytes"), str(lim.memory))
                    with contextlib.suppress(OSError):  # no swap accounting: fine
                        _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(lim.memory))
        if "cpu" in self._controllers():
            for name, lim in limits.items():
                d = self.v1_dir("cpu", name)
                _write(os.path.join(d, "cpu.shares"), str(lim.cpu_shares))
                if lim.cpu_quota_millis is not None:
                    _write(os.path.join(d, "cpu.cfs_period_us"), str(CFS_PERIOD_US))
                    quota = max(1000, lim.cpu_quota_millis * CFS_PERIOD_US // 1000)
                    _write(os.path.join(d, "cpu.cfs_quota_us"), str(quota))

    def register_ip(self, ip: str | None) -> None:
        """Tell the eBPF proxy which IP this pod's cgroup stands for (ClientIP affinity).

        Best effort: without a BPF filesystem or libbpf the pod still runs, and the
        proxy then keys the pod's affinity by its cgroup id instead.
        """
        if not ip or self.root != CGROUP_ROOT:  # a test's fake hierarchy: no kernel cgroup
            return
        from corral.ebpf import pod_cgroups

        try:
            pod_cgroups.set_ip(self.node, self.v2_dir, ip)
        except (OSError, ValueError) as e:
            log.debug("pod %s: cgroup -> IP for the eBPF proxy not recorded: %s", self.uid, e)

    def _unregister_ip(self) -> None:
        if self.root != CGROUP_ROOT:
            return
        from corral.ebpf import pod_cgroups

        try:
            pod_cgroups.forget(self.node, self.v2_dir)
        except (OSError, ValueError) as e:
            log.debug("pod %s: cgroup -> IP for the eBPF proxy not removed: %s", self.uid, e)

    def procs_files(self, container: str) -> list[str]:
        """The cgroup.procs files a container's first process writes itself into."""
        files = [
            os.path.join(self.v1_dir(c, container), "cgroup.procs") for c in self._controllers()
        ]
        return [*files, os.path.join(self.v2_dir, "cgroup.procs")]

    def oom_kills(self, container: str) -> int:
        """How many times the kernel's OOM killer struck in this container's memory cgroup."""
        try:
            with open(os.path.join(self.v1_dir("memory", container), "memory.oom_control")) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == "oom_kill":
                        return int(v)
        except OSError:
            pass
        return 0

    def pids(self) -> set[int]:
        out: set[int] = set()
        dirs = [self.v2_dir]
        for ctrl in self._controllers():
            base = self.v1_dir(ctrl)
            if os.path.isdir(base):
                dirs += [
                    os.path.join(base, n)
                    for n in os.listdir(base)
                    if os.path.isdir(os.path.join(base, n))
                ]
        for d in dirs:
            with contextlib.suppress(OSError), open(os.path.join(d, "cgroup.procs")) as f:
                out.update(int(x) for x in f.read().split())
        return out

    def remove(self, timeout: float = 5.0) -> bool:
        """SIGKILL anything left in the pod's cgroups, then remove them (leaves first)."""
        deadline = time.monotonic() + timeout
        self._unregister_ip()  # while the directory (its id) still exists
        while True:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            ok = True
            for ctrl in self._controllers():
                base = self.v1_dir(ctrl)
                if not os.path.isdir(base):
                    continue
                for n in os.listdir(base):
                    if os.path.isdir(os.path.join(base, n)):
                        ok &= _rmdir(os.path.join(base, n))
                ok &= _rmdir(base)
            ok &= _rmdir(self.v2_dir)
            if ok or time.monotonic() > deadline:
                return ok
            time.sleep(0.05)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def remove_node_dirs(node: str, root: str = CGROUP_ROOT) -> None:
    """Remove the node's (empty) cgroup subtrees, and corral/ itself when empty.

    With them goes the node's pod_cgroups map (no pod cgroup is left to name).
    """
    if root == CGROUP_ROOT:
        from corral.ebpf import pod_cgroups

        with contextlib.suppress(OSError, ValueError):
            pod_cgroups.unpin(node)
    ctrls = [os.path.join(root, c) for c in V1_CONTROLLERS] + [unified_root(root)]
    for base in ctrls:
        _rmdir(os.path.join(base, "corral", node, "pods"))
        _rmdir(os.path.join(base, "corral", node))
        _rmdir(os.path.join(base, "corral"))
