"""A test-made node for the pod runtime: used by tests/test_runtime.py and bench/pod_startup.py.

A "node" network namespace runs `corral node --components pods` (the node agent
with only its pod runtime) with its paths in a temp dir and a conflist for the
reference bridge + host-local + loopback plugins; Pods go to a real etcd, reached
from inside the node through corral's relay (corral.cluster.relay).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.api.objects import Pod
from corral.api.store import Store, now_iso
from corral.node import mounts, netlink, netns
from corral.runtime import cgroups as cg
from corral.runtime import containers

REF_BIN = "/usr/lib/cni"
PY = "/usr/bin/python3"


@dataclass
class Node:
    name: str
    ns: str
    tmp: str
    subnet: str
    store: Store
    etcd_url: str
    restart_backoff: float = 0.2
    relay: subprocess.Popen | None = None
    proc: subprocess.Popen | None = None
    log: str = ""
    created: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.tmp, "state")

    @property
    def netns_dir(self) -> str:
        return os.path.join(self.tmp, "netns")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.tmp, "ipam")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.tmp, "cni-cache")

    def start_runtime(self) -> None:
        assert self.relay is not None
        argv = [
            *netns.command(self.ns, [sys.executable, "-m", "corral", "node"]),
            "--components",
            "pods",
            "--name",
            self.name,
            "--etcd",
            self.etcd_url,
            "--netns-dir",
            self.netns_dir,
            "--state-dir",
            self.state_dir,
            "--cni-conf-dir",
            os.path.join(self.tmp, "net.d"),
            "--cni-bin-dir",
            REF_BIN,
            "--cni-cache-dir",
            self.cache_dir,
            "--run-dir",
            os.path.join(self.tmp, "run"),
            "--underlay-ip",
            "10.250.0.1",
            "--restart-backoff",
            str(self.restart_backoff),
            "--metrics-addr",
            "off",
        ]
        self.log = os.path.join(self.tmp, "runtime.log")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out)

    async def wait_runtime_ready(self, timeout: float = 60) -> None:
        """Until the runtime logs that it watches pods (its initial list and GC are done)."""
        deadline = time.monotonic() + timeout
        while "watching pods" not in self.runtime_log(whole=True):
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"runtime exited; log:\n{self.runtime_log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"runtime not ready; log:\n{self.runtime_log()}")
            await asyncio.sleep(0.05)

    async def stop_runtime(self) -> None:
        """Stop the runtime; like any node agent stopped, it leaves the pods running."""
        if self.proc is None:
            return
        # nsenter execs the runtime, so this PID is the runtime itself.
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pod(self, name: str, containers: list[dict[str, Any]], **spec: Any) -> Pod:
        return Pod.model_validate(
            {
                "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
                "spec": {
                    "nodeName": self.name,
                    "terminationGracePeriodSeconds": 2,
                    "containers": containers,
                    **spec,
                },
            }
        )

    async def create(self, pod: Pod) -> Pod:
        return await self.store.create(pod)

    async def wait_pod(
        self, name: str, pred: Callable[[Pod | None], bool], what: str, timeout: float = 90
    ) -> Pod | None:
        deadline = time.monotonic() + timeout
        p = None
        while time.monotonic() < deadline:
            p = await self.store.get(Pod, name, "default")
            if pred(p):
                return p
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"runtime exited; log:\n{self.runtime_log()}")
            await asyncio.sleep(0.1)
        status = p.status.model_dump_json(indent=1) if p else "pod gone"
        raise AssertionError(
            f"timed out waiting for {name}: {what}\n{status}\n{self.runtime_log()}"
        )

    async def delete(self, name: str, grace: int | None = None) -> None:
        """What `corral delete` does: mark the pod for deletion; the runtime finishes it."""

        def mark(p: Pod) -> Pod:
            p.metadata.deletion_timestamp = now_iso()
            p.metadata.deletion_grace_period_seconds = (
                grace if grace is not None else p.spec.termination_grace_period_seconds
            )
            return p

        await self.store.modify(Pod, name, "default", mark)

    def runtime_log(self, whole: bool = False) -> str:
        try:
            with open(self.log) as f:
                return f.read() if whole else f.read()[-4000:]
        except OSError:
            return ""

    def node_exec(self, argv: list[str]) -> subprocess.CompletedProcess:
        return netns.run(self.ns, argv, check=False, timeout=30)


def ready(p: Pod | None) -> bool:
    return p is not None and p.ready and p.status.phase == "Running"


def container_pids(p: Pod) -> dict[str, int]:
    d = json.loads(p.metadata.annotations["corral.dev/containers"])
    return {k: v["pid"] for k, v in d.items()}


def pod_run(p: Pod, argv: list[str], container: str | None = None) -> subprocess.CompletedProcess:
    """Run argv in a container as `corral exec` does (its namespaces, capabilities, user)."""
    pids = container_pids(p)
    name = container or next(iter(pids))
    pod_dir = json.loads(p.metadata.annotations["corral.dev/runtime"])["podDir"]
    return subprocess.run(
        containers.exec_argv(pod_dir, name, pids[name], argv),
        capture_output=True,
        text=True,
        timeout=30,
    )


def pod_exec(p: Pod, argv: list[str], container: str | None = None) -> str:
    r = pod_run(p, argv, container)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _add_node_ns(ns: str) -> None:
    netns.add(ns)
    with netlink.iproute(ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _sweep(n: Node) -> None:
    """What the runtime leaves behind when stopped: the pods (their processes, found
    through their cgroups, as `corral down` finds them), sandboxes and mounts."""
    for uid_dir in _glob_dirs(os.path.join(cg.CGROUP_ROOT, "memory", "corral", n.name)):
        cg.PodCgroups(n.name, os.path.basename(uid_dir)).remove()
    for uid_dir in _glob_dirs(os.path.join(cg.node_unified_dir(n.name), "pods")):
        cg.PodCgroups(n.name, os.path.basename(uid_dir)).remove()
    cg.remove_node_dirs(n.name)
    if os.path.isdir(n.netns_dir):
        from corral.node.netns import remove_pinned as remove_netns

        for f in os.listdir(n.netns_dir):
            remove_netns(os.path.join(n.netns_dir, f))
    if n.relay is not None:
        n.relay.terminate()
        n.relay.wait(30)
    netns.remove(n.ns)
    mounts.unmount_under(n.tmp)  # pods' tmpfs volumes (secrets) of a stopped runtime
    shutil.rmtree(n.tmp, ignore_errors=True)


def _glob_dirs(d: str) -> list[str]:
    try:
        return [os.path.join(d, x) for x in os.listdir(d) if os.path.isdir(os.path.join(d, x))]
    except FileNotFoundError:
        return []


def leftovers(n: Node, uid: str) -> list[str]:
    out = []
    c = cg.PodCgroups(n.name, uid)
    for d in [c.v1_dir("memory"), c.v1_dir("cpu"), c.v2_dir]:
        if os.path.exists(d):
            out.append(d)
    if os.path.isdir(n.netns_dir):
        out += os.listdir(n.netns_dir)
    if os.path.isdir(os.path.join(n.cache_dir, "results")):
        out += os.listdir(os.path.join(n.cache_dir, "results"))
    return out


async def make_node(
    etcd_url: str, etcd_port: int, store: Store, prefix: str = "rt", restart_backoff: float = 0.2
) -> Node:
    """A node namespace with the runtime running in it; `destroy_node` removes all of it."""
    tag = secrets.token_hex(3)
    tmp = tempfile.mkdtemp(prefix=f"corral-{prefix}-")
    subnet = f"10.244.{int(tag[:2], 16) % 200 + 20}.0/24"
    n = Node(
        name=f"{prefix}-{tag}",
        ns=f"c{prefix}-{tag}",
        tmp=tmp,
        subnet=subnet,
        store=store,
        etcd_url=etcd_url,
        restart_backoff=restart_backoff,
    )
    try:
        await asyncio.to_thread(_add_node_ns, n.ns)
        # etcd listens on the host's loopback: make the same URL work inside the node.
        n.relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral.cluster.relay",
                "--netns",
                n.ns,
                "--target",
                f"127.0.0.1:{etcd_port}",
            ]
        )
        os.makedirs(os.path.join(tmp, "net.d"))
        with open(os.path.join(tmp, "net.d", "10-ref.conflist"), "w") as f:
            json.dump(
                {
                    "cniVersion": "1.0.0",
                    "name": "refnet",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": subnet}]],
                                "dataDir": n.data_dir,
                            },
                        },
                        {"type": "loopback"},
                    ],
                },
                f,
            )
        n.start_runtime()
        await n.wait_runtime_ready()
    except BaseException:
        await destroy_node(n)
        raise
    return n


async def destroy_node(n: Node) -> None:
    await n.stop_runtime()
    _sweep(n)


def tiny_rootfs(path: str) -> None:
    """A tiny image root filesystem: dash, the libraries it needs, and /etc/motd."""
    os.makedirs(os.path.join(path, "bin"))
    shutil.copy2("/bin/dash", os.path.join(path, "bin", "sh"))
    out = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True).stdout
    for word in out.split():
        if word.startswith("/") and os.path.exists(word):
            dst = os.path.join(path, word.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(word, dst)
    os.makedirs(os.path.join(path, "etc"))
    with open(os.path.join(path, "etc", "motd"), "w") as f:
        f.write("from the image\n")
