"""The overlay in a real `corral up` cluster: leases, VXLAN devices, pods across nodes."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
from typing import Any

import pytest

from corral.api.objects import Node, Pod
from corral.api.store import SUBNETS_PREFIX
from corral.ebpf import loader
from integration.cluster_helpers import wait_for
from integration.podcmd import POD_PYTHON

pytestmark = pytest.mark.slow

DEADLINE = 90.0


def subnet_info(cluster: Any, node: str) -> dict[str, Any]:
    r = cluster.exec(node, "cat", "/run/corral/subnet.json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def datapath_info(cluster: Any, node: str) -> dict[str, Any]:
    """The node's datapath.json; {} until the agent has written it."""
    r = cluster.exec(node, "cat", "/run/corral/datapath.json")
    return json.loads(r.stdout) if r.returncode == 0 else {}


def test_every_node_leases_a_subnet_and_programs_vxlan(cluster: Any) -> None:
    async def read() -> tuple[list[Node], int]:
        async with cluster.store() as s:
            nodes, _ = await s.list(Node)
            kvs, _ = await s.list_raw(SUBNETS_PREFIX)
            return nodes, len(kvs)

    subnets = set()
    for name in cluster.nodes:
        info = subnet_info(cluster, name)
        assert info["node"] == name and info["network"] == "10.244.0.0/16"
        assert ipaddress.ip_network(info["subnet"]).prefixlen == 24
        subnets.add(info["subnet"])
        link = cluster.exec(name, "ip", "-d", "link", "show", "corral.1")
        assert link.returncode == 0 and "vxlan id 1" in link.stdout
        assert "nolearning" in link.stdout
    assert len(subnets) == len(cluster.nodes)
    nodes, leases = asyncio.run(read())
    assert leases == len(cluster.nodes)
    assert {n.spec.pod_cidr for n in nodes if n.name in cluster.nodes} == subnets


def test_nodes_reach_each_other_through_the_overlay(cluster: Any) -> None:
    first = cluster.nodes[0]
    for other in cluster.nodes[1:]:
        gw = subnet_info(cluster, other)["subnet"].split("/")[0]  # its corral.1 address
        wait_for(
            lambda gw=gw: cluster.exec(first, "ping", "-c", "1", "-W", "1", gw).returncode == 0,
            f"{first} to ping {gw} over VXLAN",
        )


SERVER = (
    "import socket\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7070)); s.listen()\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(a[0].encode()); c.close()\n"
)
CLIENT = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], 7070), timeout=3)\n"
    "print(c.recv(100).decode())\n"
)


def test_pods_on_different_nodes_talk_without_nat(cluster: Any) -> None:
    sfx = secrets.token_hex(3)
    names = [f"ov-srv-{sfx}", f"ov-cli-{sfx}"]
    specs = [
        Pod(
            metadata={"name": names[0]},
            spec={
                "nodeName": cluster.nodes[0],
                "containers": [{"name": "c", "command": [POD_PYTHON, "-c", SERVER]}],
            },
        ),
        Pod(
            metadata={"name": names[1]},
            spec={
                "nodeName": cluster.nodes[1],
                "containers": [{"name": "c", "command": ["sleep", "3600"]}],
            },
        ),
    ]

    async def create() -> None:
        async with cluster.store() as s:
            for p in specs:
                await s.create(p)

    async def ips() -> list[str | None]:
        async with cluster.store() as s:
            got = [await s.get(Pod, n, "default") for n in names]
        return [p.status.pod_ip if p and p.status.phase == "Running" else None for p in got]

    async def delete() -> None:
        async with cluster.store() as s:
            for n in names:
                await s.delete(Pod, n, "default")

    asyncio.run(create())
    try:
        srv_ip, cli_ip = wait_for(
            lambda: all(x := asyncio.run(ips())) and x, "both pods to run with an IP"
        )
        seen = wait_for(
            lambda: (
                (
                    r := cluster.corral("exec", names[1], "--", POD_PYTHON, "-c", CLIENT, srv_ip)
                ).returncode
                == 0
                and r.stdout.strip()
            ),
            "the client pod to reach the server pod",
        )
        assert seen == cli_ip  # the server saw the client pod's own address
        ping = cluster.corral("exec", names[1], "--", "ping", "-c", "1", "-W", "2", srv_ip)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        if loader.unavailable() is None:
            # BCC works here, so `corral up`'s nodes chose the eBPF fast path: the
            # client's node encapsulated in BPF and says so (its file is rewritten
            # by every full pass)
            wait_for(
                lambda: (
                    datapath_info(cluster, cluster.nodes[1])
                    .get("packets", {})
                    .get("encapsulated", 0)
                    > 0
                ),
                "the client node's datapath.json to count encapsulated packets",
            )
            assert datapath_info(cluster, cluster.nodes[0]).get("datapath") == "bpf"
    finally:
        asyncio.run(delete())


def test_network_show_and_refused_changes(cluster: Any) -> None:
    shown = cluster.corral("network", "show")
    assert shown.returncode == 0, shown.stderr
    for name in cluster.nodes:
        assert name in shown.stdout and cluster.ips[name] in shown.stdout
    # a pod network containing the nodes' own addresses is refused, and nothing changes
    around = ipaddress.ip_network(cluster.underlay_cidr).supernet(new_prefix=16)
    bad = cluster.corral("network", "set", "--network", str(around))
    assert bad.returncode == 1
    assert "contains the node address" in bad.stderr
    # the address plan cannot move under running nodes
    moved = cluster.corral("network", "set", "--network", "10.240.0.0/16")
    assert moved.returncode == 1 and "hold subnet leases" in moved.stderr
    assert cluster.corral("network", "show").stdout == shown.stdout


STREAM_SERVER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], 7071)); s.listen()\n"
    "c, _ = s.accept()\n"
    "while (d := c.recv(65536)):\n"
    "    c.sendall(d)\n"
)
STREAM_CLIENT = (
    "import socket, sys, time\n"
    "c = socket.create_connection((sys.argv[1], 7071), timeout=10)\n"
    "n = 0\n"
    "while True:\n"
    "    c.sendall(b'x' * 1000)\n"
    "    got = 0\n"
    "    while got < 1000:\n"
    "        d = c.recv(1000 - got)\n"
    "        if not d: raise SystemExit('connection closed')\n"
    "        got += len(d)\n"
    "    n += 1\n"
    "    if n % 20 == 0: print(n, flush=True)\n"
    "    time.sleep(0.005)\n"
)


def test_kill_9_and_restart_of_a_node_agent_keeps_a_stream(cluster: Any, tmp_path: Any) -> None:
    """A TCP stream over the overlay into node-2 survives its agent's SIGKILL and restart."""
    from corral.node.procs import start_time
    from corral.overlay.vxlan import VxlanNetlink

    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    target = subnet_info(cluster, n1)["subnet"].split("/")[0]  # node-1's corral.1 address

    def overlay_state() -> dict[str, Any]:
        out = {}
        for n in (n1, n2):
            k = VxlanNetlink(cluster.netns[n])
            try:
                out[n] = k.snapshot("corral.1")
            finally:
                k.close()
        out["nat"] = cluster.exec(n2, "iptables", "-t", "nat", "-S").stdout
        return out

    agent = next(d for d in cluster.state().daemons if d.role == "daemon:node" and d.node == n2)
    progress = tmp_path / "progress"
    srv = subprocess.Popen(cluster.exec_argv(n1, sys.executable, "-c", STREAM_SERVER, target))
    wait_for(
        lambda: f"{target}:7071" in cluster.exec(n1, "ss", "-ltnH").stdout,
        "the stream server to listen",
    )
    with open(progress, "w") as out:
        cli = subprocess.Popen(
            cluster.exec_argv(n2, sys.executable, "-c", STREAM_CLIENT, target),
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        count = lambda: len(progress.read_text().split())  # noqa: E731
        wait_for(lambda: count() > 3, "the stream to flow")
        before = overlay_state()
        os.kill(agent.pid, signal.SIGKILL)
        wait_for(lambda: start_time(agent.pid) is None, "the agent to die")
        seen = count()
        wait_for(lambda: count() > seen + 3, "the stream to go on without an agent")
        up = cluster.up_again()
        assert up.returncode == 0, up.stderr + up.stdout
        new = next(d for d in cluster.state().daemons if d.role == "daemon:node" and d.node == n2)
        assert new.pid != agent.pid
        wait_for(
            lambda: cluster.log("node", n2).count("overlay ready") >= 2,
            "the restarted agent's overlay to be ready",
        )
        seen = count()
        wait_for(lambda: count() > seen + 3, "the stream to go on after the restart")
        assert cli.poll() is None, "the stream broke"
        assert overlay_state() == before
    finally:
        for p in (cli, srv):
            if p.poll() is None:
                p.kill()
            p.wait()
