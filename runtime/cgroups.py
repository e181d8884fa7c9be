"""Pod cgroups under a corral-owned subtree per node; never the root's own settings.

Each resource controller is written where the machine has it (node/cgroups.py
finds the hierarchy):

- on cgroup2 (a unified hierarchy, e.g. stock Debian 12):
      <cgroup2>/corral/<node>/pods/<pod-uid>/<container>
  corral's directories enable memory, cpu and pids for their children
  (cgroup.subtree_control, as the kernel's no-internal-processes rule needs leaves);
  each container's leaf gets memory.max, cpu.max (the CFS quota), cpu.weight (from
  its cpu request, the kubelet's shares-to-weight conversion) and pids.max; the pod's
  directory the pod's memory.max and cpu.max. OOM kills are counted from the
  leaf's memory.events. Every process of the container joins its leaf.
- on v1 (this machine's hybrid hierarchy, or legacy):
      /sys/fs/cgroup/<memory|cpu|pids>/corral/<node>/<pod-uid>/<container>
  memory.limit_in_bytes (and memsw where swap is accounted), cpu.shares and the CFS
  quota; OOM kills from memory.oom_control. On a hybrid hierarchy every process also
  joins the pod's cgroup2 directory (no controller written there), which is what
  the eBPF proxy's programs and its pod_cgroups map key on.
On cgroup2 the proxy's map names the pod's leaves as well as the pod (the kernel
reports the leaf's id).
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
from corral.node.cgroups import (
    CGROUP_ROOT,
    RESOURCE_CONTROLLERS,
    cgroup2_root,
    node_unified_dir,
    read_controllers,
    unified_root,
)

log = logging.getLogger(__name__)

V1_CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000


@dataclass
class Limits:
    memory: int | None = None  # bytes
    cpu_quota_millis: int | None = None
    cpu_shares: int = 2

    @property
    def cpu_weight(self) -> int:
        """cgroup2's cpu.weight for these shares (the kubelet's CpuSharesToCpuWeight)."""
        return 1 + ((self.cpu_shares - 2) * 9999) // 262142

    @property
    def cpu_max(self) -> str:
        if self.cpu_quota_millis is None:
            return f"max {CFS_PERIOD_US}"
        return f"{max(1000, self.cpu_quota_millis * CFS_PERIOD_US // 1000)} {CFS_PERIOD_US}"

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
    def __init__(
        self, node: str, pod_uid: str, root: str = CGROUP_ROOT, pids_limit: int | None = None
    ) -> None:
        self.node, self.uid, self.root = node, pod_uid, root
        # The kubelet's podPidsLimit: pids.max of each container on cgroup2 (None: max).
        self.pids_limit = pids_limit
        self._v2: set[str] | None = None

    def v1_dir(self, ctrl: str, container: str | None = None) -> str:
        d = os.path.join(self.root, ctrl, "corral", self.node, self.uid)
        return os.path.join(d, container) if container else d

    @property
    def v2_dir(self) -> str:
        return os.path.join(node_unified_dir(self.node, self.root), "pods", self.uid)

    def v2_controllers(self) -> set[str]:
        """The resource controllers this machine has on cgroup2 (all on a unified
        hierarchy; none on this hybrid one, where cgroup2 holds only hugetlb)."""
        if self._v2 is None:
            cg2 = cgroup2_root(self.root)
            have = read_controllers(os.path.join(cg2, "cgroup.controllers")) if cg2 else set()
            self._v2 = have & set(RESOURCE_CONTROLLERS)
        return self._v2

    def _controllers(self) -> list[str]:
        """The v1 controllers to write (those not on cgroup2)."""
        v2 = self.v2_controllers()
        return [
            c for c in V1_CONTROLLERS if c not in v2 and os.path.isdir(os.path.join(self.root, c))
        ]

    def _enable_v2(self, leaves: list[str]) -> None:
        """Make the pod's directory and its containers' leaves, each level of corral's
        subtree enabling the controllers its parent gives it (a child's
        cgroup.controllers is its parent's cgroup.subtree_control)."""
        cg2 = unified_root(self.root)
        want = self.v2_controllers()
        levels = [os.path.join(cg2, "corral"), node_unified_dir(self.node, self.root)]
        levels += [os.path.dirname(self.v2_dir), self.v2_dir]
        have = read_controllers(os.path.join(cg2, "cgroup.subtree_control"))
        missing = want - have
        if missing:
            raise OSError(
                f"cgroup2 at {cg2} does not delegate {', '.join(sorted(missing))} to its "
                "children (cgroup.subtree_control); pod limits cannot be enforced"
            )
        for d in levels:
            os.makedirs(d, exist_ok=True)
            ctl = os.path.join(d, "cgroup.subtree_control")
            if want - read_controllers(ctl):
                _write(ctl, " ".join(f"+{c}" for c in sorted(want)))
        for name in leaves:
            os.makedirs(os.path.join(self.v2_dir, name), exist_ok=True)

    def _write_v2(
        self, app: dict[str, Limits], every: dict[str, Limits], pod_memory: int | None
    ) -> None:
        want = self.v2_controllers()
        d = self.v2_dir
        if "memory" in want:
            _write(os.path.join(d, "memory.max"), str(pod_memory) if pod_memory else "max")
        if "cpu" in want:
            quotas = [lim.cpu_quota_millis for lim in app.values()]
            every_quota = bool(quotas) and all(q is not None for q in quotas)
            pod = Limits(cpu_quota_millis=sum(quotas) if every_quota else None)  # type: ignore[arg-type]
            _write(os.path.join(d, "cpu.max"), pod.cpu_max)
        for name, lim in every.items():
            leaf = os.path.join(d, name)
            if "memory" in want:
                _write(os.path.join(leaf, "memory.max"), str(lim.memory) if lim.memory else "max")
                with contextlib.suppress(OSError):  # no swap for a container, as v1's memsw
                    _write(os.path.join(leaf, "memory.swap.max"), "0")
            if "cpu" in want:
                _write(os.path.join(leaf, "cpu.max"), lim.cpu_max)
                _write(os.path.join(leaf, "cpu.weight"), str(lim.cpu_weight))
            if "pids" in want:
                _write(
                    os.path.join(leaf, "pids.max"),
                    str(self.pids_limit) if self.pids_limit else "max",
                )

    def create(self, limits: dict[str, Limits], init: dict[str, Limits] | None = None) -> None:
        """Make the pod's dirs (idempotent) and apply each container's limits.

        The pod's memory limit is the sum of its containers' (when each has one), or the
        largest init container's if that is more: init containers run one at a time,
        before the others (Kubernetes' effective pod limit)."""
        app = limits
        limits = {**(init or {}), **limits}
        mems = [lim.memory for lim in app.values()]
        init_mems = [lim.memory for lim in (init or {}).values()]
        total = None
        if mems and all(m is not None for m in [*mems, *init_mems]):
            total = max([sum(m for m in mems if m is not None), *init_mems])  # type: ignore[type-var]
        if self.v2_controllers():
            self._enable_v2(list(limits))
            self._write_v2(app, limits, total)
        elif cgroup2_root(self.root) is not None:
            os.makedirs(self.v2_dir, exist_ok=True)  # hybrid: the eBPF proxy's pod cgroup
        for ctrl in self._controllers():
            for name in limits:
                os.makedirs(self.v1_dir(ctrl, name), exist_ok=True)
        if "memory" in self._controllers():
            if total is not None:
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
            for d in self._v2_dirs():
                pod_cgroups.set_ip(self.node, d, ip)
        except (OSError, ValueError) as e:
            log.debug("pod %s: cgroup -> IP for the eBPF proxy not recorded: %s", self.uid, e)

    def _unregister_ip(self) -> None:
        if self.root != CGROUP_ROOT:
            return
        from corral.ebpf import pod_cgroups

        try:
            for d in self._v2_dirs():
                pod_cgroups.forget(self.node, d)
        except (OSError, ValueError) as e:
            log.debug("pod %s: cgroup -> IP for the eBPF proxy not removed: %s", self.uid, e)

    def _v2_dirs(self) -> list[str]:
        """The pod's cgroup2 directory and its containers' leaves (when there are)."""
        out = [self.v2_dir]
        with contextlib.suppress(OSError):
            out += [e.path for e in os.scandir(self.v2_dir) if e.is_dir(follow_symlinks=False)]
        return out

    def procs_files(self, container: str) -> list[str]:
        """The cgroup.procs files a container's first process writes itself into."""
        files = [
            os.path.join(self.v1_dir(c, container), "cgroup.procs") for c in self._controllers()
        ]
        if self.v2_controllers():  # cgroup2 limits: the container's own leaf
            return [*files, os.path.join(self.v2_dir, container, "cgroup.procs")]
        if cgroup2_root(self.root) is None:  # v1 only
            return files
        return [*files, os.path.join(self.v2_dir, "cgroup.procs")]

    def oom_kills(self, container: str) -> int:
        """How many times the kernel's OOM killer struck in this container's memory cgroup."""
        if "memory" in self.v2_controllers():
            try:
                with open(os.path.join(self.v2_dir, container, "memory.events")) as f:
                    for line in f:
                        k, _, v = line.partition(" ")
                        if k == "oom_kill":
                            return int(v)
            except OSError:
                pass
            return 0
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
        dirs = self._v2_dirs()
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
            for d in reversed(self._v2_dirs()):  # the leaves, then the pod
                ok &= _rmdir(d)
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
