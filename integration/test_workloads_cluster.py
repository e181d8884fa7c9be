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


def _manifest(ns: str, plaintext: str, conf: str) -> str:
    return json.dumps(
        {
            "kind": "List",
            "apiVersion": "v1",
            "items": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "app", "namespace": ns},
                    "data": {"conf": conf, "color": "blue"},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "creds", "namespace": ns},
                    "stringData": {"password": plaintext},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "cfg", "namespace": ns},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "volumes": [
                            {"name": "cfg", "configMap": {"name": "app"}},
                            {"name": "creds", "secret": {"secretName": "creds"}},
                        ],
                        "containers": [
                            {
                                "name": "c",
                                "command": ["sleep", "3600"],
                                "env": [
                                    {
                                        "name": "COLOR",
                                        "valueFrom": {
                                            "configMapKeyRef": {"name": "app", "key": "color"}
                                        },
                                    }
                                ],
                                "volumeMounts": [
                                    {"name": "cfg", "mountPath": "/run/cfg"},
                                    {"name": "creds", "mountPath": "/run/creds"},
                                ],
                            }
                        ],
                    },
                },
            ],
        }
    )


def test_configmap_and_secret_volumes_on_a_node(cluster: Any) -> None:
    """A Secret mounted on a real node is on tmpfs in the node's mount namespace and its
    plaintext is nowhere on the disk under the node's state; a ConfigMap change reaches
    the mounted file; the env comes from the ConfigMap."""
    ns = f"cfg{secrets.token_hex(2)}"
    plaintext = "pw-" + secrets.token_hex(12)
    assert cluster.corral("create", "namespace", ns).returncode == 0
    try:
        r = cluster.corral("apply", "-f", "-", input=_manifest(ns, plaintext, "v1"))
        assert r.returncode == 0, r.stderr

        def pod() -> dict | None:
            r = cluster.corral("get", "pod", "cfg", "-n", ns, "-o", "json")
            p = json.loads(r.stdout) if r.returncode == 0 else None
            conds = (p or {}).get("status", {}).get("conditions", [])
            ok = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
            return p if ok else None

        p = wait_for(pod, "the pod running with its volumes")
        node = p["spec"]["nodeName"]

        def in_pod(*cmd: str) -> str:
            r = cluster.corral("exec", "cfg", "-n", ns, "--", *cmd, timeout=60)
            d = cluster.corral("describe", "pod", "cfg", "-n", ns).stdout
            logs = "\n".join(
                line
                for n in cluster.nodes
                for line in cluster.log("node", n).splitlines()
                if "cfg" in line or "rror" in line
            )
            assert r.returncode == 0, r.stderr + d + logs
            return r.stdout

        assert in_pod("cat", "/run/creds/password") == plaintext
        assert in_pod("cat", "/run/cfg/conf") == "v1"
        assert "COLOR=blue" in in_pod("cat", "/proc/1/environ").split("\0")
        node = p["spec"]["nodeName"]
        pod_dir = json.loads(p["metadata"]["annotations"]["corral.dev/runtime"])["podDir"]
        secret_dir = os.path.join(pod_dir, "volumes", "kubernetes.io~secret", "creds")
        r = cluster.exec(node, "stat", "-f", "-c", "%T", secret_dir)
        assert r.stdout.strip() == "tmpfs", r.stdout + r.stderr
        # the node's state on disk: every mount below it detached in a private namespace
        state = os.path.dirname(os.path.dirname(pod_dir))
        script = (
            'for m in $(findmnt -rn -o TARGET | grep "^$1"); do umount -l "$m"; done; '
            'grep -rlF -- "$2" "$1" || true'
        )
        r = cluster.exec(node, "unshare", "-m", "sh", "-c", script, "sh", state, plaintext)
        assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr

        # only the ConfigMap: re-applying the Pod would replace it (corral apply has no
        # three-way merge, so the scheduler's spec.nodeName would be dropped)
        cm = json.loads(_manifest(ns, plaintext, "v2"))["items"][0]
        r = cluster.corral("apply", "-f", "-", input=json.dumps(cm))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: in_pod("cat", "/run/cfg/conf") == "v2", "the ConfigMap change")

        assert cluster.corral("delete", "pod", "cfg", "-n", ns).returncode == 0
        wait_for(
            lambda: cluster.exec(node, "test", "-e", secret_dir).returncode != 0,
            "the secret volume gone with the pod",
        )
        r = cluster.exec(node, "findmnt", "-rn", "-o", "TARGET")
        assert secret_dir not in r.stdout
    finally:
        cluster.corral("delete", "namespace", ns)
