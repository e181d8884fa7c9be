"""`corral up --apiservers N`: N API servers behind the `kubernetes` Service, each one
answering kubectl, and the Service's endpoints following which of them are alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from typing import Any

import pytest

from integration.cluster_helpers import wait_for

pytestmark = pytest.mark.slow

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33"


def kubectl(cluster: Any, *args: str, server: str | None = None) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": tempfile.gettempdir() + f"/corral-kubectl-{cluster.name}",
        "KUBECONFIG": os.path.join(cluster.state_dir, "kubeconfig"),
    }
    extra = ["--server", f"https://{server}:6443"] if server else []
    return subprocess.run(
        [KUBECTL, *extra, *args], capture_output=True, text=True, env=env, timeout=60
    )


def endpoint_ips(cluster: Any) -> set[str]:
    r = kubectl(cluster, "get", "endpoints", "kubernetes", "-o", "json")
    if r.returncode != 0:
        return set()
    ep = json.loads(r.stdout)
    return {a["ip"] for s in ep.get("subsets", []) for a in s.get("addresses", [])}


def apiserver_pids(cluster: Any) -> dict[str, int]:
    st = cluster.state()
    return {r.node: r.pid for r in st.daemons if r.role == "daemon:apiserver"}


@pytest.mark.skipif(not os.access(KUBECTL, os.X_OK), reason="no kubectl 1.33")
def test_two_api_servers_behind_the_kubernetes_service(cluster: Any) -> None:
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    r = cluster.corral("up", "--name", cluster.name, "--apiservers", "2", "--wait", "120")
    try:
        assert r.returncode == 0, r.stderr
        assert set(apiserver_pids(cluster)) == {n1, n2}
        ips = {cluster.ips[n1], cluster.ips[n2]}
        wait_for(lambda: endpoint_ips(cluster) == ips, "both servers in the endpoints")
        for node in (n1, n2):  # each answers, with a certificate valid for its address
            r = kubectl(cluster, "get", "nodes", "-o", "name", server=cluster.ips[node])
            assert r.returncode == 0 and r.stdout.count("node/") == len(cluster.nodes), r.stderr
        # one dies: its lease runs out and the Service names only the other
        os.kill(apiserver_pids(cluster)[n2], signal.SIGKILL)
        wait_for(
            lambda: endpoint_ips(cluster) == {cluster.ips[n1]}, "the dead server to drop out", 60
        )
        # bad input changes nothing
        r = cluster.corral("up", "--name", cluster.name, "--apiservers", "9")
        assert r.returncode != 0 and "--apiservers 9" in r.stderr
    finally:
        r = cluster.corral("up", "--name", cluster.name, "--apiservers", "1", "--wait", "120")
        assert r.returncode == 0, r.stderr
    assert set(apiserver_pids(cluster)) == {n1}
    wait_for(lambda: endpoint_ips(cluster) == {cluster.ips[n1]}, "one server again")
