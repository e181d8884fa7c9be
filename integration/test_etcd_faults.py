"""etcd faults under a running cluster: frozen (SIGSTOP) past the subnet lease TTL,
then killed (-9) and brought back by `corral up`. Checked by their outcomes: no pod
deleted or restarted, every node Ready again, every subnet lease back with the same
subnet, pod-to-pod traffic across nodes never stopped, health honest meanwhile."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from corral.runtime.containers import nsenter_argv
from corral.runtime.podstatus import ANN_CONTAINERS
from integration.cluster_helpers import pods_of, wait_for
from integration.clusters import LocalCluster, local_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fc() -> Iterator[LocalCluster]:
    with local_cluster(3, "--dns-replicas", "0") as c:  # no DNS needed: a faster up
        r = c.corral("run", "steady", "--replicas", "3", "--command", "--", "sleep", "3600")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: _running(c) == 3, "3 steady pods Running")
        yield c


def _running(c: LocalCluster) -> int:
    return sum(p.get("status", {}).get("phase") == "Running" for p in pods_of(c, "steady"))


def _pods(c: LocalCluster) -> dict[str, tuple[str, int]]:
    """uid -> (node, restart count) of the steady pods."""
    return {
        p["metadata"]["uid"]: (
            p["spec"]["nodeName"],
            sum(cs.get("restartCount", 0) for cs in p["status"].get("containerStatuses", [])),
        )
        for p in pods_of(c, "steady")
    }


def _leases(c: LocalCluster) -> dict[str, str]:
    """node -> leased subnet."""
    r = c.corral("network", "show", "-o", "json")
    assert r.returncode == 0, r.stderr
    return {ls["nodeName"]: ls["subnet"] for ls in json.loads(r.stdout)["leases"]}


def _etcd_pid(c: LocalCluster) -> int:
    rec = c.state().etcd_members[0].record
    assert rec is not None
    return rec.pid


def _all_ready(c: LocalCluster) -> bool:
    r = c.corral("get", "nodes", "-o", "json")
    if r.returncode != 0:
        return False
    items = json.loads(r.stdout)["items"]
    return len(items) == len(c.nodes) and all(
        any(x["type"] == "Ready" and x["status"] == "True" for x in n["status"]["conditions"])
        for n in items
    )


def _pinger(c: LocalCluster) -> subprocess.Popen:
    """A ping between two steady pods on different nodes, every 0.2 s, until killed."""
    pods = pods_of(c, "steady")
    a, b = pods[0], next(p for p in pods if p["spec"]["nodeName"] != pods[0]["spec"]["nodeName"])
    (entry,) = json.loads(a["metadata"]["annotations"][ANN_CONTAINERS]).values()
    argv = nsenter_argv(int(entry["pid"]), ["ping", "-i", "0.2", "-W", "1", b["status"]["podIP"]])
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _stop_pinger(p: subprocess.Popen) -> tuple[int, int, int]:
    """(sent, received, the longest run of unanswered pings) of the pinger. The last
    one or two may be in flight when it stops, and do not count in the run."""
    os.killpg(p.pid, signal.SIGINT)  # nsenter forks ping (a PID namespace): signal both
    out, _ = p.communicate(timeout=30)
    line = next(ln for ln in out.splitlines() if "packets transmitted" in ln)
    sent, received = (int(x.split()[0]) for x in line.split(",")[:2])
    answered = {int(m) for m in re.findall(r"icmp_seq=(\d+)", out)}
    run = longest = 0
    for seq in range(1, max(sent - 1, 1)):
        run = 0 if seq in answered else run + 1
        longest = max(longest, run)
    return sent, received, longest


def test_a_frozen_etcd_loses_nothing(fc: LocalCluster) -> None:
    pods, leases = _pods(fc), _leases(fc)
    pinger = _pinger(fc)
    pid = _etcd_pid(fc)
    os.kill(pid, signal.SIGSTOP)
    try:
        # Cut off: every daemon says so (none claims ok), the nodes' pods go on.
        wait_for(
            lambda: fc.corral("status", timeout=120).stdout.count("UNHEALTHY") >= len(fc.nodes),
            "every node daemon to report etcd unreachable",
            timeout=60,
        )
        time.sleep(35)  # past the subnet lease TTL (30 s): the leases expire meanwhile
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: _all_ready(fc), "every node Ready again")
    wait_for(lambda: _leases(fc) == leases, "every lease back, with the same subnet")
    wait_for(lambda: fc.corral("status").returncode == 0, "every daemon healthy again")
    sent, received, gap = _stop_pinger(pinger)
    # No outage: never more than two pings in a row unanswered (0.4 s; a reply later than
    # 1 s on a loaded machine is one), and nearly all answered.
    assert gap <= 2, f"pod traffic stopped: {gap} pings in a row unanswered"
    assert received >= sent * 0.97, f"pod traffic lost: {received} of {sent} pings answered"
    assert _pods(fc) == pods, "a pod was deleted, moved or restarted"
    # The control plane works again: a new pod is scheduled and runs.
    assert fc.corral("scale", "rc", "steady", "--replicas", "4").returncode == 0
    wait_for(lambda: _running(fc) == 4, "the fourth pod Running")
    assert fc.corral("scale", "rc", "steady", "--replicas", "3").returncode == 0
    wait_for(lambda: len(pods_of(fc, "steady")) == 3, "back to 3 pods")


def test_a_killed_etcd_comes_back_where_the_daemons_look(fc: LocalCluster) -> None:
    urls, pods = fc.state().etcd_urls, _pods(fc)
    os.kill(_etcd_pid(fc), signal.SIGKILL)
    r = fc.corral("status", timeout=120)
    assert r.returncode != 0 and "DOWN" in r.stdout, r.stdout
    r = fc.corral("up", "--name", fc.name, timeout=300)
    assert r.returncode == 0, r.stderr
    assert fc.state().etcd_urls == urls, "etcd moved: the running daemons would not find it"
    wait_for(lambda: fc.corral("status").returncode == 0, "every daemon healthy again")
    assert _pods(fc) == pods
