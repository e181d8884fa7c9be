"""Replicas on a real cluster: spread, reachable, scaled, and moved when their node is lost."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
from typing import Any

import pytest

from integration.cluster_helpers import pods_of, wait_for
from integration.podcmd import POD_PYTHON

pytestmark = pytest.mark.slow


def ready_pods(cluster: Any, app: str, want: int, nodes: set[str] | None = None) -> list[dict]:
    """`want` ready, non-terminating pods of `app` (on `nodes` if given), else []."""
    out = []
    for p in pods_of(cluster, app):
        conds = p.get("status", {}).get("conditions", [])
        if p["metadata"].get("deletionTimestamp"):
            return []
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
            return []
        if nodes is not None and p["spec"].get("nodeName") not in nodes:
            return []
        out.append(p)
    return out if len(out) == want else []


def pod_cidrs(cluster: Any) -> dict[str, ipaddress.IPv4Network]:
    out = {}
    for node in cluster.nodes:
        r = cluster.corral("get", "nodes", node, "-o", "json")
        out[node] = ipaddress.ip_network(json.loads(r.stdout)["spec"]["podCIDR"])
    return out


def test_replicas_spread_scale_and_move_off_a_lost_node(cluster: Any) -> None:
    app = f"rep{secrets.token_hex(2)}"
    lost = cluster.nodes[-1]
    r = cluster.corral(
        "run",
        app,
        "--replicas",
        "6",
        "--port",
        "8080",
        "--requests",
        "cpu=50m,memory=32Mi",
        "--command",
        "--",
        POD_PYTHON,
        "-m",
        "http.server",
        "8080",
    )
    assert r.returncode == 0, r.stderr
    try:
        pods = wait_for(lambda: ready_pods(cluster, app, 6), "6 ready replicas")
        per_node = {n: sum(p["spec"]["nodeName"] == n for p in pods) for n in cluster.nodes}
        assert set(per_node.values()) == {2}, f"6 replicas over 3 nodes: {per_node}"

        # Each pod's IP is from its node's subnet, and it answers on its port from
        # another node, over the overlay.
        cidrs = pod_cidrs(cluster)
        for p in pods:
            ip, node = p["status"]["podIP"], p["spec"]["nodeName"]
            assert ipaddress.ip_address(ip) in cidrs[node]
            other = next(n for n in cluster.nodes if n != node)
            r = cluster.exec(
                other,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                f"http://{ip}:8080/",
            )
            assert r.stdout == "200", f"{ip} on {node} from {other}: {r.stderr}"

        assert cluster.corral("scale", "rc", app, "--replicas", "2").returncode == 0
        wait_for(
            lambda: ready_pods(cluster, app, 2) and len(pods_of(cluster, app)) == 2,
            "scale down to 2",
        )
        assert cluster.corral("scale", "rc", app, "--replicas", "6").returncode == 0
        wait_for(lambda: ready_pods(cluster, app, 6), "scale back up to 6")

        # Lose a node: its agent dies and the operator removes it. Its pods move.
        agent = next(
            d for d in cluster.state().daemons if d.role == "daemon:node" and d.node == lost
        )
        os.kill(agent.pid, signal.SIGKILL)
        r = cluster.corral("delete", "node", lost)
        assert r.returncode == 0, r.stderr
        survivors = set(cluster.nodes) - {lost}
        wait_for(
            lambda: ready_pods(cluster, app, 6, survivors),
            f"6 ready replicas on {', '.join(sorted(survivors))}",
            timeout=180,
        )
    finally:
        cluster.corral("delete", "rc", app, "--ignore-not-found", "--grace-period", "1")
        # Bring the lost node back, as the operator would: `corral up` restarts its agent,
        # which registers the node again and tears down the pods deleted meanwhile.
        up = cluster.up_again()
        assert up.returncode == 0, up.stderr + up.stdout
        wait_for(lambda: not pods_of(cluster, app), "the replicas to be gone", timeout=180)
