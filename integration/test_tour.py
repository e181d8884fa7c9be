"""README's tour, as a user types it: run, expose, reach across nodes, scale, delete."""

from __future__ import annotations

import ipaddress
import json
import secrets
from typing import Any

import pytest

from integration.cluster_helpers import pods_of, wait_for
from integration.podcmd import POD_PYTHON

pytestmark = pytest.mark.slow


def ready(p: dict) -> bool:
    conds = p.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def endpoint_ips(cluster: Any, svc: str) -> set[str]:
    r = cluster.corral("get", "endpoints", svc, "-o", "json")
    if r.returncode != 0:
        return set()
    ep = json.loads(r.stdout)
    return {a["ip"] for s in ep.get("subsets", []) for a in s.get("addresses", [])}


def test_readme_tour(cluster: Any) -> None:
    app = f"web{secrets.token_hex(2)}"
    r = cluster.corral(
        "run",
        app,
        "--replicas",
        "3",
        "--port",
        "8080",
        "--command",
        "--",
        POD_PYTHON,
        "-m",
        "http.server",
        "8080",
    )
    assert r.returncode == 0, r.stderr
    try:
        r = cluster.corral("expose", app, "--port", "80", "--target-port", "8080")
        assert r.returncode == 0, r.stderr
        pods = wait_for(
            lambda: (
                (ps := pods_of(cluster, app)) and len(ps) == 3 and all(ready(p) for p in ps) and ps
            ),
            "3 ready replicas",
        )

        # Each pod's IP comes from the subnet its node leased.
        cidrs = {}
        for node in cluster.nodes:
            r = cluster.corral("get", "nodes", node, "-o", "json")
            cidrs[node] = ipaddress.ip_network(json.loads(r.stdout)["spec"]["podCIDR"])
        for p in pods:
            assert ipaddress.ip_address(p["status"]["podIP"]) in cidrs[p["spec"]["nodeName"]]
        assert len({p["spec"]["nodeName"] for p in pods}) == 3, "replicas are spread"

        # The service has a VIP and its endpoints are exactly the ready pods.
        svc = json.loads(cluster.corral("get", "svc", app, "-o", "json").stdout)
        assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network(
            "10.96.0.0/12"
        )
        ips = {p["status"]["podIP"] for p in pods}
        wait_for(lambda: endpoint_ips(cluster, app) == ips, "endpoints = the 3 pod IPs")

        # Pod to pod across nodes by their own IPs; the server sees the client's IP.
        a, b = (
            pods[0],
            next(p for p in pods if p["spec"]["nodeName"] != pods[0]["spec"]["nodeName"]),
        )
        r = cluster.corral(
            "exec",
            a["metadata"]["name"],
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            f"http://{b['status']['podIP']}:8080/",
        )
        assert r.stdout == "200", r.stderr
        wait_for(
            lambda: a["status"]["podIP"] in cluster.corral("logs", b["metadata"]["name"]).stdout,
            "the server log to show the client pod IP",
        )

        # By name through the pod's search path: cluster DNS, then the proxy.
        for name in (app, f"{app}.default", f"{app}.default.svc.cluster.local"):
            r = cluster.corral(
                "exec",
                a["metadata"]["name"],
                "--",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://{name}/",
            )
            assert r.stdout == "200", (name, r.stderr)

        # Scale up and down: endpoints follow.
        assert cluster.corral("scale", "rc", app, "--replicas", "4").returncode == 0
        wait_for(lambda: len(endpoint_ips(cluster, app)) == 4, "4 endpoints")
        assert cluster.corral("scale", "rc", app, "--replicas", "2").returncode == 0
        wait_for(
            lambda: len(endpoint_ips(cluster, app)) == 2 and len(pods_of(cluster, app)) == 2,
            "2 pods and endpoints",
        )

        # A deleted pod is replaced; its IP leaves the endpoints.
        victim = pods_of(cluster, app)[0]
        r = cluster.corral("delete", "pod", victim["metadata"]["name"], "--grace-period", "1")
        assert r.returncode == 0, r.stderr
        wait_for(
            lambda: (
                victim["status"]["podIP"] not in endpoint_ips(cluster, app)
                and len(endpoint_ips(cluster, app)) == 2
            ),
            "a replacement in the endpoints",
        )
    finally:
        cluster.corral("delete", "rc", app, "--ignore-not-found", "--grace-period", "1")
        cluster.corral("delete", "svc", app, "--ignore-not-found")
        wait_for(lambda: not pods_of(cluster, app), "the tour's pods to be gone")
