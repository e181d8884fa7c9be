"""Pod features of the node runtime with real pods: hostNetwork, lifecycle.preStop with
terminationGracePeriodSeconds, and init containers (tests/runtime_harness.py nodes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from corral.api.objects import Pod
from corral.api.store import Store
from corral.cli.output import pod_status
from corral.cluster.etcd import LocalEtcd
from tests.runtime_harness import (
    REF_BIN,
    Node,
    container_pids,
    destroy_node,
    leftovers,
    make_node,
    pod_exec,
    ready,
)

pytestmark = pytest.mark.skipif(
    not os.path.exists(f"{REF_BIN}/bridge"), reason="reference CNI plugins not installed"
)
PY = "/usr/bin/python3"
HOST_IP = "10.250.0.1"  # the harness node's --underlay-ip


@pytest.fixture
async def node(etcd: LocalEtcd, store: Store) -> AsyncIterator[Node]:
    n = await make_node(etcd.url, etcd.client_port, store)
    try:
        yield n
    finally:
        await destroy_node(n)


@pytest.fixture
def gate() -> Iterator[str]:
    """A directory the test writes and containers read: the node's root is theirs,
    read-only, but not its /tmp, /var/tmp or /run (each container has its own), nor
    /root or /home; the checkout may be under any of them, so not beside this file."""
    d = tempfile.mkdtemp(prefix="corral-test-gate-", dir="/var/lib")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def log_of(p: Pod, container: str) -> str:
    path = json.loads(p.metadata.annotations["corral.dev/containers"])[container]["log"]
    with open(path, errors="replace") as f:
        return f.read()


async def wait_log(p: Pod, container: str, text: str, timeout: float = 60) -> str:
    """The container's log once `text` is in it (read while the pod still exists)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            out = log_of(p, container)
            if text in out:
                return out
        assert time.monotonic() < deadline, f"{text!r} never reached {container}'s log"
        await asyncio.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _state(p: Pod | None, container: str, init: bool = False) -> dict:
    assert p is not None
    sts = p.status.init_container_statuses if init else p.status.container_statuses
    return next(c for c in sts if c.name == container).state


# ---------------------------------------------------------------- hostNetwork


async def test_host_network_pod_runs_in_the_nodes_namespace(node: Node) -> None:
    assert node.node_exec(["ip", "addr", "add", f"{HOST_IP}/32", "dev", "lo"]).returncode == 0
    web = {
        "name": "web",
        "command": [PY, "-m", "http.server", "18080"],
        "ports": [{"containerPort": 18080, "name": "http"}],
        "readinessProbe": {"httpGet": {"port": "http"}, "periodSeconds": 1},
    }
    await node.create(node.pod("hostnet", [web], hostNetwork=True))
    p = await node.wait_pod("hostnet", ready, "Ready")
    assert p is not None
    assert p.status.pod_ip == p.status.host_ip == HOST_IP
    assert [i.ip for i in p.status.pod_ips] == [HOST_IP]
    # The node's own namespace: the same netns inode, its addresses, its port.
    pid = container_pids(p)["web"]
    node_ns = node.node_exec(["readlink", "/proc/self/ns/net"]).stdout.strip()
    assert os.readlink(f"/proc/{pid}/ns/net") == node_ns
    assert f"{HOST_IP}/32" in pod_exec(p, ["ip", "-o", "addr", "show", "dev", "lo"])
    r = node.node_exec(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:18080/"]
    )
    assert r.stdout == "200", r
    # No sandbox: no CNI ADD (nothing cached, no IP from IPAM), no netns pinned.
    assert not os.path.isdir(os.path.join(node.cache_dir, "results")) or not os.listdir(
        os.path.join(node.cache_dir, "results")
    )
    assert not os.path.isdir(node.data_dir) or not any(
        f[0].isdigit() for f in os.listdir(os.path.join(node.data_dir, "refnet"))
    )
    assert not os.listdir(node.netns_dir)
    # As the kubelet: the node's hostname and (ClusterFirst) the node's resolv.conf.
    assert pod_exec(p, ["hostname"]).strip() == node.name
    with open("/etc/resolv.conf") as f:
        assert pod_exec(p, ["cat", "/etc/resolv.conf"]) == f.read()
    # NET_RAW is not in a hostNetwork pod's defaults (it would reach the node's links).
    caps = pod_exec(p, ["grep", "CapEff", "/proc/self/status"]).split()[1]
    assert int(caps, 16) == 0xA80425FB & ~(1 << 13), caps
    # Delete: graceful as ever, and nothing to tear down in the network.
    await node.delete("hostnet", grace=1)
    await node.wait_pod("hostnet", lambda p: p is None, "deleted")
    assert leftovers(node, p.metadata.uid or "") == []
    assert node.node_exec(["ip", "-o", "addr", "show", "dev", "lo"]).stdout.count(HOST_IP) == 1


# ---------------------------------------------------------------- preStop

# The container prints what preStop left in its /tmp when SIGTERM comes.
RELEASE = "while [ ! -f /tmp/release ]; do sleep 0.1; done; exit 0"
TRAP = (
    "trap 'cat /tmp/order 2>/dev/null; echo got-term; {after}' TERM; while true; do sleep 0.1; done"
)


async def test_pre_stop_exec_runs_before_sigterm(node: Node) -> None:
    c = {
        "name": "c",
        "command": ["sh", "-c", TRAP.format(after=RELEASE)],
        "lifecycle": {
            "preStop": {"exec": {"command": ["sh", "-c", "sleep 0.5; echo pre-stop > /tmp/order"]}}
        },
    }
    await node.create(node.pod("prestop", [c], terminationGracePeriodSeconds=30))
    p = await node.wait_pod("prestop", ready, "Ready")
    assert p is not None
    await node.delete("prestop", grace=30)
    out = await wait_log(p, "c", "got-term")
    assert out.splitlines()[-2:] == ["pre-stop", "got-term"]
    pod_exec(p, ["touch", "/tmp/release"])
    await node.wait_pod("prestop", lambda p: p is None, "deleted once the container exits")
    assert "preStop hook done" in node.runtime_log(whole=True)
    assert leftovers(node, p.metadata.uid or "") == []


async def test_pre_stop_that_hangs_is_cut_at_the_grace_period(node: Node) -> None:
    # The hook never returns and the container ignores SIGTERM: at the end of the grace
    # period the hook is given up, SIGTERM comes, then SIGKILL.
    c = {
        "name": "c",
        "command": ["sh", "-c", TRAP.format(after=":")],
        "lifecycle": {
            "preStop": {"exec": {"command": ["sh", "-c", "echo hung > /tmp/order; sleep 600"]}}
        },
    }
    await node.create(node.pod("hangs", [c]))
    p = await node.wait_pod("hangs", ready, "Ready")
    assert p is not None
    pid = container_pids(p)["c"]
    await node.delete("hangs", grace=2)
    out = await wait_log(p, "c", "got-term")
    assert out.splitlines()[-2:] == ["hung", "got-term"]
    await node.wait_pod("hangs", lambda p: p is None, "deleted after SIGKILL")
    assert not alive(pid)
    assert "preStop hook failed" in node.runtime_log(whole=True)


async def test_pre_stop_http_get(node: Node) -> None:
    c = {
        "name": "web",
        "command": [PY, "-m", "http.server", "8080"],
        "ports": [{"containerPort": 8080, "name": "http"}],
        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
        "lifecycle": {"preStop": {"httpGet": {"port": "http", "path": "/bye"}}},
    }
    await node.create(node.pod("prestop-http", [c]))
    p = await node.wait_pod("prestop-http", ready, "Ready")
    assert p is not None
    await node.delete("prestop-http", grace=2)
    await wait_log(p, "web", '"GET /bye HTTP/1.1" 404')
    await node.wait_pod("prestop-http", lambda p: p is None, "deleted")


# ---------------------------------------------------------------- init containers


async def test_init_containers_run_in_order_before_the_app(node: Node, gate: str) -> None:
    pod = node.pod(
        "inits",
        [{"name": "app", "command": ["sleep", "3600"]}],
        initContainers=[
            {"name": "first", "command": ["sh", "-c", "echo first; sleep 0.3"]},
            # Fails (and is restarted with back-off) until the test opens the gate.
            {"name": "wait", "command": ["sh", "-c", f"test -e {gate}/open && echo open"]},
        ],
    )
    await node.create(pod)
    p = await node.wait_pod(
        "inits",
        lambda p: (
            p is not None
            and any(
                c.name == "wait" and c.restart_count >= 1 for c in p.status.init_container_statuses
            )
        ),
        "the failing init container to be restarted",
    )
    assert p is not None and p.status.phase == "Pending"
    cond = p.status.condition("Initialized")
    assert cond is not None and cond.status == "False" and cond.reason == "ContainersNotInitialized"
    first = _state(p, "first", init=True)["terminated"]
    assert (first["exitCode"], first["reason"]) == (0, "Completed")
    assert _state(p, "app") == {"waiting": {"reason": "PodInitializing"}}
    assert pod_status(p) in ("Init:1/2", "Init:Error", "Init:CrashLoopBackOff")
    with open(os.path.join(gate, "open"), "w"):
        pass
    p = await node.wait_pod("inits", ready, "Ready once the init containers are done")
    assert p is not None and pod_status(p) == "Running"
    assert {c.type: c.status for c in p.status.conditions}["Initialized"] == "True"
    inits = {c.name: c for c in p.status.init_container_statuses}
    assert inits["first"].restart_count == 0 and inits["wait"].restart_count >= 1
    assert all(c.ready and c.state["terminated"]["exitCode"] == 0 for c in inits.values())
    # In order: first ended before wait's last run began, which ended before app began.
    wait_run = inits["wait"].state["terminated"]
    assert first["finishedAt"] <= wait_run["startedAt"]
    assert wait_run["finishedAt"] <= _state(p, "app")["running"]["startedAt"]
    # `corral logs -c INIT`: the init container's last run.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral.cli.main",
            "--etcd",
            node.etcd_url,
            "logs",
            "inits",
            "-c",
            "wait",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (0, "open\n"), r.stderr
    await node.delete("inits", grace=1)
    await node.wait_pod("inits", lambda p: p is None, "deleted")
    assert leftovers(node, p.metadata.uid or "") == []


async def test_failed_init_container_fails_the_pod_under_never(node: Node) -> None:
    pod = node.pod(
        "initfail",
        [{"name": "app", "command": ["sleep", "3600"]}],
        initContainers=[{"name": "bad", "command": ["sh", "-c", "exit 3"]}],
        restartPolicy="Never",
    )
    await node.create(pod)
    p = await node.wait_pod(
        "initfail", lambda p: p is not None and p.status.phase == "Failed", "Failed"
    )
    assert p is not None
    bad = _state(p, "bad", init=True)["terminated"]
    assert (bad["exitCode"], bad["reason"]) == (3, "Error")
    assert _state(p, "app") == {"waiting": {"reason": "PodInitializing"}}  # never started
    assert pod_status(p) == "Init:Error"
    # Its network is released, as for any finished pod; the object stays for its status.
    ip = p.status.pod_ip
    deadline_ok = await node.wait_pod(
        "initfail",
        lambda _p: not os.path.exists(os.path.join(node.data_dir, "refnet", ip or "")),
        "the IP to go back",
        timeout=30,
    )
    assert deadline_ok is not None
    await node.delete("initfail", grace=1)
    await node.wait_pod("initfail", lambda p: p is None, "deleted")
