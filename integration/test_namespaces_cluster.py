"""Namespaces on a real `corral up` cluster: the built-in ones exist, and deleting one
stops its pods gracefully (their nodes run the normal termination) before it goes."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from integration.cluster_helpers import wait_for

pytestmark = pytest.mark.slow

# Pods that ignore SIGTERM: their nodes stop them at the end of the grace period (30 s),
# so a graceful stop is seen as pods Terminating while the namespace waits for them.
SLOW_STOP = """
apiVersion: v1
kind: ReplicationController
metadata: {name: slow, namespace: NS}
spec:
  replicas: 2
  template:
    metadata: {labels: {app: slow}}
    spec:
      terminationGracePeriodSeconds: 30
      containers:
      - name: slow
        command:
        - python3
        - -c
        - "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
"""


def _get(cluster: Any, *args: str) -> dict | None:
    r = cluster.corral("get", *args, "-o", "json")
    return json.loads(r.stdout) if r.returncode == 0 else None


def test_builtin_namespaces_exist_from_corral_up(cluster: Any) -> None:
    r = cluster.corral("get", "ns")
    assert r.returncode == 0, r.stderr
    names = {line.split()[0] for line in r.stdout.splitlines()[1:]}
    assert {"default", "kube-system", "kube-public", "corral-system"} <= names


def test_deleting_a_namespace_stops_its_pods_gracefully(cluster: Any) -> None:
    ns = f"ns{secrets.token_hex(2)}"
    r = cluster.corral("run", "x", "-n", ns, "--", "sleep", "1")
    assert r.returncode == 1 and f"namespace {ns!r} not found" in r.stderr
    assert cluster.corral("create", "namespace", ns).returncode == 0
    r = cluster.corral("apply", "-f", "-", input=SLOW_STOP.replace("NS", ns))
    assert r.returncode == 0, r.stderr

    def running() -> list[dict]:
        pods = (_get(cluster, "pods", "-n", ns) or {}).get("items", [])
        ok = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
        return ok if len(ok) == 2 else []

    wait_for(running, "2 running pods in the namespace")
    r = cluster.corral("delete", "namespace", ns)
    assert r.returncode == 0 and r.stdout == f"namespace/{ns} deleted\n", r.stderr

    def terminating() -> dict | None:
        got = _get(cluster, "ns", ns)
        conds = {c["type"]: c for c in (got or {}).get("status", {}).get("conditions", [])}
        rem = conds.get("NamespaceContentRemaining")
        return got if rem and rem["status"] == "True" else None

    got = wait_for(terminating, "the namespace waiting for its pods", timeout=60)
    assert got["status"]["phase"] == "Terminating"
    msg = {c["type"]: c for c in got["status"]["conditions"]}["NamespaceContentRemaining"]
    assert msg["message"].startswith("Some resources are remaining: pods has")
    pods = (_get(cluster, "pods", "-n", ns) or {}).get("items", [])
    assert pods and all(p["metadata"].get("deletionTimestamp") for p in pods)
    assert {p["metadata"]["deletionGracePeriodSeconds"] for p in pods} == {30}
    assert _get(cluster, "rc", "slow", "-n", ns) is None  # owners went first

    # deleting it again is fine; --wait returns once the pods have stopped and it is gone
    r = cluster.corral("delete", "ns", ns, "--wait", "--timeout", "120", timeout=180)
    assert r.returncode == 0, r.stderr
    assert _get(cluster, "ns", ns) is None
    assert (_get(cluster, "pods", "-n", ns) or {"items": []})["items"] == []
