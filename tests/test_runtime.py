"""The node runtime with real pods: processes, the reference CNI plugins, cgroups, etcd.

Each test gets a fresh node (tests/runtime_harness.py): a network namespace
running the node agent's pod runtime alone against the reference bridge + host-local +
loopback plugins, and the real etcd.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.api.objects import ContainerStatus, Pod
from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd
from corral.runtime import cgroups as cg
from tests.runtime_harness import (
    REF_BIN,
    Node,
    container_pids,
    destroy_node,
    leftovers,
    make_node,
    pod_exec,
    pod_run,
    ready,
    tiny_rootfs,
)

pytestmark = pytest.mark.skipif(
    not os.path.exists(f"{REF_BIN}/bridge"), reason="reference CNI plugins not installed"
)
PY = "/usr/bin/python3"


@pytest.fixture
async def node(etcd: LocalEtcd, store: Store) -> AsyncIterator[Node]:
    n = await make_node(etcd.url, etcd.client_port, store)
    try:
        yield n
    finally:
        await destroy_node(n)


# ---------------------------------------------------------------- tests


def web(port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {
        "name": "web",
        "command": [PY, "-m", "http.server", str(port)],
        "ports": [{"containerPort": port, "name": "http"}],
        "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 1},
        **extra,
    }


async def test_pods_get_ips_answer_and_go_away(node: Node) -> None:
    limited = {
        "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "500m", "memory": "256Mi"}}
    }
    pods = [await node.create(node.pod(f"web-{i}", [web(8080 + i, **limited)])) for i in range(2)]
    got = [await node.wait_pod(p.name, ready, "Ready") for p in pods]
    ips = [p.status.pod_ip for p in got if p]
    assert len(set(ips)) == 2
    for p, ip in zip(got, ips, strict=True):
        assert p is not None and ip is not None
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(node.subnet)
        assert p.status.host_ip == "10.250.0.1"
        assert {c.type: c.status for c in p.status.conditions} == {
            "PodScheduled": "True",
            "Initialized": "True",
            "ContainersReady": "True",
            "Ready": "True",
        }
        port = p.spec.containers[0].ports[0].container_port
        r = node.node_exec(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{ip}:{port}/"]
        )
        assert r.stdout == "200", r
        # Inside: the pod's DNS config, hosts entry, hostname and its own PID namespace.
        resolv = pod_exec(p, ["cat", "/etc/resolv.conf"])
        assert resolv.splitlines() == [
            "nameserver 10.96.0.10",
            "search default.svc.cluster.local svc.cluster.local cluster.local",
            "options ndots:5",
        ]
        assert f"{ip}\t{p.name}" in pod_exec(p, ["cat", "/etc/hosts"])
        assert pod_exec(p, ["hostname"]).strip() == p.name
        assert pod_exec(p, ["cat", "/proc/1/cmdline"]).startswith(PY)
        # Its processes sit in the node's cgroup2 dir (where the eBPF proxy attaches).
        v2 = cg.PodCgroups(node.name, p.metadata.uid or "").v2_dir
        with open(os.path.join(v2, "cgroup.procs")) as f:
            procs = f.read().split()
        assert str(container_pids(p)["web"]) in procs
        # Limits: CPU quota 500m of a 100 ms period, shares from the request, memory.
        pc = cg.PodCgroups(node.name, p.metadata.uid or "")
        files = {
            "cpu.cfs_quota_us": ("cpu", "50000"),
            "cpu.shares": ("cpu", "102"),
            "memory.limit_in_bytes": ("memory", str(256 << 20)),
        }
        for fname, (ctrl, want) in files.items():
            with open(os.path.join(pc.v1_dir(ctrl, "web"), fname)) as f:
                assert f.read().strip() == want, fname

    await node.delete("web-0", grace=1)
    await node.wait_pod("web-0", lambda p: p is None, "deleted")
    uid0 = got[0].metadata.uid if got[0] else ""
    assert not [x for x in leftovers(node, uid0 or "") if "results" in x or x.startswith(uid0)]
    # The IP went back to host-local, the other pod is untouched.
    assert not os.path.exists(os.path.join(node.data_dir, "refnet", ips[0]))
    assert os.path.exists(os.path.join(node.data_dir, "refnet", ips[1]))
    assert ready(await node.store.get(Pod, "web-1", "default"))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def cstatus(p: Pod | None, name: str | None = None) -> ContainerStatus:
    """The container's status (an empty one until the runtime has reported it)."""
    statuses = p.status.container_statuses if p is not None else []
    return next(
        (c for c in statuses if name is None or c.name == name), ContainerStatus(name=name or "?")
    )


async def test_memory_limit_oom_killed_and_restarted(node: Node) -> None:
    hog = {
        "name": "hog",
        "command": [PY, "-c", "import time; x = bytearray(300 << 20); time.sleep(100)"],
        "resources": {"limits": {"memory": "48Mi"}},
    }
    await node.create(node.pod("hog", [hog]))
    p = await node.wait_pod("hog", lambda p: cstatus(p).restart_count >= 1, "a restart")
    last = cstatus(p).last_state["terminated"]
    assert last["reason"] == "OOMKilled" and last["exitCode"] == 137
    c = cg.PodCgroups(node.name, p.metadata.uid or "")
    with open(os.path.join(c.v1_dir("memory", "hog"), "memory.limit_in_bytes")) as f:
        assert int(f.read()) == 48 << 20


async def test_probes_drive_ready_and_liveness_restarts(node: Node) -> None:
    # The flags live in the container's own /tmp (a pod does not see the node's files):
    # the test sets and clears them with exec, as a user would.
    ready_flag, live = "/tmp/ready-flag", "/tmp/live-flag"
    await node.create(
        node.pod(
            "probed",
            [
                {
                    "name": "main",
                    "command": [
                        "sh",
                        "-c",
                        f"touch {live}; sleep 2; exec " + PY + " -m http.server 8090",
                    ],
                    "ports": [{"containerPort": 8090}],
                    "readinessProbe": {
                        "exec": {"command": ["test", "-f", ready_flag]},
                        "periodSeconds": 1,
                    },
                    "livenessProbe": {
                        "exec": {"command": ["test", "-f", live]},
                        "periodSeconds": 1,
                        "failureThreshold": 2,
                    },
                },
                {
                    "name": "side",
                    "command": ["sleep", "1000"],
                    "readinessProbe": {"tcpSocket": {"port": 8090}, "periodSeconds": 1},
                },
            ],
        )
    )
    # Running, but the exec probe keeps the pod out of Ready while the flag is absent,
    # even once the TCP probe of the other container succeeds.
    p = await node.wait_pod("probed", lambda p: cstatus(p, "side").ready, "TCP probe ready")
    assert p is not None and not p.ready and p.status.phase == "Running"
    assert p.status.condition("Ready").reason == "ContainersNotReady"
    pod_exec(p, ["touch", ready_flag], "main")
    p = await node.wait_pod("probed", ready, "Ready after the flag appears")
    pod_exec(p, ["rm", ready_flag], "main")
    p = await node.wait_pod(
        "probed", lambda p: p is not None and not p.ready, "not Ready after the flag goes"
    )
    # Liveness: the failing probe gets the container killed and restarted (the new
    # instance makes its flag again).
    pod_exec(p, ["rm", live], "main")
    p = await node.wait_pod(
        "probed", lambda p: cstatus(p, "main").restart_count >= 1, "liveness restart"
    )
    assert cstatus(p, "side").restart_count == 0, node.runtime_log()


async def test_http_probe_follows_the_status_code(node: Node) -> None:
    await node.create(
        node.pod(
            "h",
            [
                web(
                    8091,
                    workingDir="/tmp",
                    command=["sh", "-c", f"mkdir www && cd www && exec {PY} -m http.server 8091"],
                    readinessProbe={
                        "httpGet": {"port": 8091, "path": "/healthz.txt"},
                        "periodSeconds": 1,
                    },
                )
            ],
        )
    )
    p = await node.wait_pod("h", lambda p: cstatus(p).state.get("running") is not None, "Running")
    assert p is not None
    deadline = time.monotonic() + 30
    while pod_run(p, ["test", "-d", "/tmp/www"]).returncode != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    pod_exec(p, ["sh", "-c", "echo ok > /tmp/www/healthz.txt"])
    p = await node.wait_pod("h", ready, "Ready once the page answers 200")
    pod_exec(p, ["rm", "/tmp/www/healthz.txt"])
    await node.wait_pod("h", lambda p: p is not None and not p.ready, "not Ready on 404")


async def test_graceful_termination_order(node: Node) -> None:
    # The container reports on stdout (its log); the test releases it with exec.
    script = (
        "trap 'echo got-term; ip -o link show eth0 >/dev/null && echo net-up; "
        "while [ ! -f /tmp/release ]; do sleep 0.1; done; exit 0' TERM; "
        "while true; do sleep 0.1; done"
    )
    created = await node.create(
        node.pod(
            "grace",
            [{"name": "c", "command": ["sh", "-c", script]}],
            terminationGracePeriodSeconds=60,
        )
    )
    p = await node.wait_pod("grace", ready, "Ready")
    assert p is not None
    ip, uid = p.status.pod_ip, created.metadata.uid or ""
    log = json.loads(p.metadata.annotations["corral.dev/containers"])["c"]["log"]
    await node.delete("grace", grace=60)
    deadline = time.monotonic() + 60
    while "net-up" not in open(log).read():  # noqa: SIM115
        assert time.monotonic() < deadline, node.runtime_log()
        await asyncio.sleep(0.05)
    # SIGTERM came while the pod object, its IP and its network were all still there.
    p = await node.store.get(Pod, "grace", "default")
    assert p is not None and p.metadata.deletion_timestamp
    assert os.path.exists(os.path.join(node.data_dir, "refnet", ip or ""))
    pod_exec(p, ["touch", "/tmp/release"])
    await node.wait_pod("grace", lambda p: p is None, "deleted after the container exits")
    assert not os.path.exists(os.path.join(node.data_dir, "refnet", ip or ""))
    assert leftovers(node, uid) == []
    assert not os.path.exists(os.path.join(node.state_dir, "pods", uid))


async def test_sigkill_after_grace(node: Node) -> None:
    await node.create(
        node.pod(
            "stubborn",
            [
                {
                    "name": "c",
                    "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"],
                }
            ],
        )
    )
    p = await node.wait_pod("stubborn", ready, "Ready")
    assert p is not None
    pid = container_pids(p)["c"]
    await node.delete("stubborn", grace=1)
    await node.wait_pod("stubborn", lambda p: p is None, "deleted after SIGKILL")
    assert not alive(pid)
    assert leftovers(node, p.metadata.uid or "") == []


async def test_failures_are_reported_and_run_to_completion(node: Node) -> None:
    await node.create(node.pod("badcmd", [{"name": "c", "command": ["/no/such/binary"]}]))
    await node.create(
        node.pod("fails", [{"name": "c", "command": ["sh", "-c", "exit 3"]}], restartPolicy="Never")
    )
    await node.create(
        node.pod("done", [{"name": "c", "command": ["true"]}], restartPolicy="OnFailure")
    )
    p = await node.wait_pod("badcmd", lambda p: cstatus(p).restart_count >= 2, "restarts")
    assert cstatus(p).last_state["terminated"]["exitCode"] == 127
    p = await node.wait_pod(
        "fails", lambda p: p is not None and p.status.phase == "Failed", "Failed"
    )
    assert cstatus(p).state["terminated"]["exitCode"] == 3 and cstatus(p).restart_count == 0
    p = await node.wait_pod(
        "done", lambda p: p is not None and p.status.phase == "Succeeded", "Succeeded"
    )
    assert cstatus(p).state["terminated"]["reason"] == "Completed"
    # A finished pod gives its IP back (the sandbox is gone) but keeps its status.
    ip = p.status.pod_ip
    deadline = time.monotonic() + 30
    while os.path.exists(os.path.join(node.data_dir, "refnet", ip or "")):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_image_rootfs_with_overlay(node: Node) -> None:
    image = os.path.join(node.tmp, "image")
    tiny_rootfs(image)
    await node.create(
        node.pod(
            "img",
            [
                {
                    "name": "c",
                    "image": image,
                    "workingDir": "/etc",
                    "command": [
                        "/bin/sh",
                        "-c",
                        "echo written > /new-file; while true; do sleep 1; done",
                    ],
                }
            ],
        )
    )
    p = await node.wait_pod("img", ready, "Ready")
    assert p is not None
    deadline = time.monotonic() + 30
    while pod_exec(p, ["/bin/sh", "-c", "test -f /new-file && echo y || echo n"]) != "y\n":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert pod_exec(
        p, ["/bin/sh", "-c", "read l < /etc/motd; echo $l; pwd; read n < /new-file; echo $n"]
    ).split("\n")[:3] == ["from the image", "/etc", "written"]
    assert "nameserver 10.96.0.10" in pod_exec(
        p, ["/bin/sh", "-c", "read l < /etc/resolv.conf; echo $l"]
    )
    assert not os.path.exists(os.path.join(image, "new-file"))  # the image stays read-only


async def test_runtime_restart_adopts_pods_and_cleans_up_deleted_ones(node: Node) -> None:
    await node.create(node.pod("keep", [web(8092)]))
    await node.create(node.pod("drop", [{"name": "c", "command": ["sleep", "1000"]}]))
    keep = await node.wait_pod("keep", ready, "Ready")
    drop = await node.wait_pod("drop", ready, "Ready")
    assert keep is not None and drop is not None
    keep_pid, drop_pid = container_pids(keep)["web"], container_pids(drop)["c"]
    await node.stop_runtime()
    assert alive(keep_pid) and alive(drop_pid)  # stopping the runtime leaves pods running
    await node.store.delete(Pod, "drop", "default")  # deleted while the node was away
    node.start_runtime()
    await node.wait_pod("drop", lambda p: p is None, "gone")
    deadline = time.monotonic() + 60
    drop_cg = cg.PodCgroups(node.name, drop.metadata.uid or "")
    while (
        alive(drop_pid)
        or os.path.exists(drop_cg.v2_dir)
        or len(os.listdir(node.netns_dir)) != 1
        or len(os.listdir(os.path.join(node.cache_dir, "results"))) != 1
    ):
        assert time.monotonic() < deadline, node.runtime_log()
        await asyncio.sleep(0.1)
    assert not os.path.exists(os.path.join(node.data_dir, "refnet", drop.status.pod_ip or ""))
    assert not os.path.exists(drop_cg.v1_dir("memory"))
    # The surviving pod was adopted, not restarted: same process, same IP, still answering.
    p = await node.wait_pod(
        "keep",
        lambda p: (
            p is not None
            and p.ready
            and json.loads(p.metadata.annotations["corral.dev/runtime"])["pid"] == node.proc.pid
        ),
        "adopted",
    )
    assert p is not None and container_pids(p)["web"] == keep_pid
    assert p.status.pod_ip == keep.status.pod_ip and cstatus(p).restart_count == 0
    # It stayed Ready throughout (no flap out of its services' endpoints).
    assert (
        p.status.condition("Ready").last_transition_time
        == keep.status.condition("Ready").last_transition_time
    )
    r = node.node_exec(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{p.status.pod_ip}:8092/"]
    )
    assert r.stdout == "200"


def corral(node: Node, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", "--etcd", node.etcd_url, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_logs_and_exec_cli(node: Node) -> None:
    await node.create(
        node.pod(
            "talker",
            [
                {
                    "name": "c",
                    "env": [{"name": "GREETING", "value": "hi"}],
                    "command": ["sh", "-c", "echo hello-$GREETING; echo oops >&2; exec sleep 1000"],
                }
            ],
        )
    )
    await node.wait_pod("talker", ready, "Ready")
    deadline = time.monotonic() + 30
    while "hello-hi" not in (r := corral(node, "logs", "talker")).stdout:
        assert time.monotonic() < deadline, r
        await asyncio.sleep(0.2)
    assert r.returncode == 0 and "oops" in r.stdout
    r = await asyncio.to_thread(
        corral, node, "exec", "talker", "--", "sh", "-c", "echo $GREETING $(hostname); exit 4"
    )
    assert r.returncode == 4 and r.stdout.strip() == "hi talker"
    r = corral(node, "exec", "nope", "--", "true")
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = corral(node, "logs", "talker", "-c", "other")
    assert r.returncode == 1 and "container other is not valid for pod talker" in r.stderr
    r = corral(node, "logs", "talker", "--previous")
    assert r.returncode == 1 and "previous terminated container" in r.stderr
    # -f follows the output until the container ends.
    await node.create(
        node.pod(
            "counter",
            [{"name": "c", "command": ["sh", "-c", "echo one; sleep 2; echo two"]}],
            restartPolicy="Never",
        )
    )
    await node.wait_pod("counter", lambda p: cstatus(p).state.get("running") is not None, "Running")
    r = await asyncio.to_thread(corral, node, "logs", "-f", "counter")
    assert r.returncode == 0 and r.stdout.split() == ["one", "two"], r


async def test_network_not_ready_is_reported_then_retried(node: Node) -> None:
    conf = os.path.join(node.tmp, "net.d", "10-ref.conflist")
    saved = conf + ".off"
    os.rename(conf, saved)
    await node.create(node.pod("early", [{"name": "c", "command": ["sleep", "1000"]}]))
    p = await node.wait_pod(
        "early",
        lambda p: p is not None and p.status.reason == "NetworkPluginNotReady",
        "the reason",
    )
    assert p is not None and "no network config" in (p.status.message or "")
    assert p.status.phase == "Pending" and not p.ready
    os.rename(saved, conf)  # the CNI config lands (as when the node's CNI server starts)
    p = await node.wait_pod("early", ready, "Ready once the network is there")
    assert p is not None and p.status.reason is None


async def test_startup_probe_gates_started_and_ready(node: Node) -> None:
    flag = "/tmp/started-flag"  # in the container's own /tmp
    await node.create(
        node.pod(
            "slow",
            [
                {
                    "name": "c",
                    "command": ["sleep", "1000"],
                    "startupProbe": {
                        "exec": {"command": ["test", "-f", flag]},
                        "periodSeconds": 1,
                        "failureThreshold": 1000,
                    },
                }
            ],
        )
    )
    p = await node.wait_pod(
        "slow", lambda p: cstatus(p).state.get("running") is not None, "Running"
    )
    assert cstatus(p).started is False and not cstatus(p).ready and not p.ready
    pod_exec(p, ["touch", flag])
    p = await node.wait_pod("slow", ready, "Ready once the startup probe passes")
    assert cstatus(p).started is True and cstatus(p).restart_count == 0
