"""A 3-member etcd (`corral up --etcd-members 3`): one member lost changes nothing a user
sees; quorum lost stops changes cleanly (CNI answers "try again later", nothing is left
half-made) while running pods keep talking; restored, everything converges with no
duplicate or leaked address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from corral.api.objects import Node
from corral.runtime.containers import nsenter_argv
from corral.runtime.podstatus import ANN_CONTAINERS
from integration.cluster_helpers import pods_of, wait_for
from integration.clusters import LocalCluster, local_cluster

pytestmark = pytest.mark.slow

# Runs inside a node: one CNI ADD of corral-cni with the node's own conflist, as a
# runtime would make it, into a fresh namespace; prints the plugin's exit code and stdout.
CNI_ADD = r"""
import hashlib, json, os, subprocess, sys
cid, ns = sys.argv[1], "/run/netns/" + sys.argv[1]
if not os.path.exists(ns):
    subprocess.run(["ip", "netns", "add", sys.argv[1]], check=True)
conf = json.load(open("/etc/cni/net.d/10-corral.conflist"))
plugin = dict(conf["plugins"][0], cniVersion=conf["cniVersion"], name=conf["name"])
env = dict(os.environ, CNI_COMMAND=sys.argv[2], CNI_CONTAINERID=cid, CNI_NETNS=ns,
           CNI_IFNAME="eth0", CNI_PATH="/opt/cni/bin")
p = subprocess.run(["/opt/cni/bin/corral-cni"], input=json.dumps(plugin), env=env,
                   capture_output=True, text=True, timeout=120)
links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
if sys.argv[2] == "DEL" or p.returncode != 0:
    subprocess.run(["ip", "netns", "del", sys.argv[1]], check=False)
veth = "veth" + hashlib.sha256(f"{cid}/eth0".encode()).hexdigest()[:11]
print(json.dumps({"rc": p.returncode, "out": p.stdout, "veth": veth in links}))
"""


@pytest.fixture(scope="module")
def ha() -> Iterator[LocalCluster]:
    # no DNS pods: the allocations checked here are exactly the tests' own pods
    with local_cluster(2, "--etcd-members", "3", "--dns-replicas", "0") as c:
        yield c


def members(c: LocalCluster) -> list[int]:
    return [m.record.pid for m in c.state().etcd_members if m.record is not None]


def cni(c: LocalCluster, node: str, cid: str, command: str = "ADD") -> dict:
    r = c.exec(node, "python3", "-c", CNI_ADD, cid, command, timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


async def allocations(c: LocalCluster) -> dict[str, str]:
    """IP -> owning container ID, over every pool."""
    async with c.store() as store:
        kvs, _ = await store.list_raw("/corral/v1/ipam/")
    return {
        kv.key.rsplit("/", 1)[1]: json.loads(kv.value)["containerID"]
        for kv in kvs
        if "/ips/" in kv.key
    }


def running_ips(c: LocalCluster, app: str) -> set[str]:
    return {
        p["status"]["podIP"]
        for p in pods_of(c, app)
        if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
    }


async def assert_no_leak(c: LocalCluster, apps: list[str]) -> None:
    live = set().union(*(running_ips(c, a) for a in apps)) if apps else set()
    allocs = await allocations(c)
    assert set(allocs) == live, f"allocations {sorted(allocs)} vs running pods {sorted(live)}"


def ready_nodes(c: LocalCluster) -> bool:
    r = c.corral("get", "nodes", "-o", "json")
    if r.returncode != 0:
        return False
    nodes = [Node.model_validate(n) for n in json.loads(r.stdout)["items"]]
    return len(nodes) == len(c.nodes) and all(
        (n.status.condition("Ready") or object()).status == "True"  # type: ignore[attr-defined]
        for n in nodes
    )


async def test_losing_one_member_changes_nothing(ha: LocalCluster) -> None:
    first = members(ha)[0]  # every client's first endpoint
    os.kill(first, signal.SIGKILL)
    try:
        r = ha.corral("status")
        assert "2 of 3 healthy" in r.stdout, r.stdout
        assert r.returncode != 0  # a member is down: status says so
        # Pod churn while the member is gone: scale up, down, and away.
        r = ha.corral("run", "churn", "--replicas", "6", "--command", "--", "sleep", "3600")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(running_ips(ha, "churn")) == 6, "6 churn pods Running")
        await assert_no_leak(ha, ["churn"])
        assert ha.corral("scale", "rc", "churn", "--replicas", "2").returncode == 0
        wait_for(lambda: len(pods_of(ha, "churn")) == 2, "churn scaled to 2")
        wait_for(lambda: len(running_ips(ha, "churn")) == 2, "2 churn pods Running")
        await assert_no_leak(ha, ["churn"])
    finally:
        r = ha.corral("up", "--name", ha.name)  # brings the member back
        assert r.returncode == 0, r.stderr
    r = ha.corral("status")
    assert "3 of 3 healthy" in r.stdout, r.stdout + r.stderr
    assert ha.corral("delete", "rc", "churn").returncode == 0
    wait_for(lambda: not pods_of(ha, "churn"), "churn pods gone")
    wait_for(lambda: not running_ips(ha, "churn"), "churn pods gone")


async def test_quorum_lost_stops_changes_cleanly_and_traffic_flows(ha: LocalCluster) -> None:
    r = ha.corral("run", "talk", "--replicas", "2", "--command", "--", "sleep", "3600")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: len(running_ips(ha, "talk")) == 2, "2 talk pods Running")
    pods = pods_of(ha, "talk")
    assert {p["spec"]["nodeName"] for p in pods} == set(ha.nodes), "one pod per node"
    b = pods[1]["status"]["podIP"]
    (entry,) = json.loads(pods[0]["metadata"]["annotations"][ANN_CONTAINERS]).values()
    pid_a = int(entry["pid"])
    before = await allocations(ha)

    frozen = members(ha)[:2]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        # No quorum: a CNI ADD says "try again later" and leaves no interface behind.
        res = cni(ha, "node-1", "quorumless0")
        assert res["rc"] != 0, res
        assert json.loads(res["out"])["code"] == 11, res
        assert not res["veth"], "ADD left a veth behind"
        # Pods already running keep talking across nodes (entered by PID: `corral exec`
        # itself needs etcd to find the pod).
        r = subprocess.run(
            nsenter_argv(pid_a, ["ping", "-c", "3", "-W", "5", b]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = ha.corral("status", timeout=120)
        assert r.returncode != 0 and "DOWN" in r.stdout
        # The daemons say they are cut off (their etcd probe fails), none claims ok.
        wait_for(
            lambda: "node=UNHEALTHY" in ha.corral("status", timeout=120).stdout,
            "the node daemons to report unhealthy",
            timeout=90,
        )
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)

    wait_for(lambda: ha.corral("status").returncode == 0, "the cluster healthy again")
    wait_for(lambda: ready_nodes(ha), "every node Ready again")
    after = await allocations(ha)
    assert after == before, "an address was allocated or lost while etcd had no quorum"
    assert "quorumless0" not in after.values()
    await assert_no_leak(ha, ["talk"])
    # Changes work again: a new ADD gets a fresh, unique address, and DEL frees it.
    res = cni(ha, "node-1", "quorumback0")
    assert res["rc"] == 0, res
    ip = json.loads(res["out"])["ips"][0]["address"].split("/")[0]
    assert ip not in before
    res = cni(ha, "node-1", "quorumback0", "DEL")
    assert res["rc"] == 0, res
    assert ha.corral("delete", "rc", "talk").returncode == 0
    wait_for(lambda: not pods_of(ha, "talk"), "talk pods gone")
