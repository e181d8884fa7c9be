"""`kubectl logs` and `kubectl exec` on a `corral up` cluster: the API server relays them
to the pod's node (apiserver/nodeproxy.py -> runtime/nodeapi.py), from any machine."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from corral.cluster import kubeconfig, pki
from integration.cluster_helpers import wait_for

pytestmark = pytest.mark.slow

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.{}"
NEWEST, OLDEST = 33, 27


def have(minor: int) -> bool:
    return os.access(KUBECTL.format(minor), os.X_OK)


@pytest.fixture(scope="module")
def kubectl(cluster: Any) -> Iterator[Any]:
    """kubectl 1.NN with the cluster's kubeconfig and a HOME of its own."""
    if not have(NEWEST):
        pytest.skip("no kubectl 1.33 on this machine")
    home = tempfile.mkdtemp(prefix="corral-kubectl-home-")
    config = os.path.join(cluster.state_dir, "kubeconfig")

    def run(
        *args: str, minor: int = NEWEST, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ["PATH"], "HOME": home, "KUBECONFIG": config}
        return subprocess.run(
            [KUBECTL.format(minor), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    yield run
    subprocess.run(["rm", "-rf", home], check=False)


def apply_pod(kubectl: Any, name: str, script: str, restart: str = "Never") -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "command": ["sh", "-c", script]}],
        },
    }
    r = kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    assert r.returncode == 0, r.stderr


def phase(kubectl: Any, name: str) -> str:
    r = kubectl("get", "pod", name, "-o", "jsonpath={.status.phase}")
    return r.stdout.strip()


def test_logs_of_a_finished_pod_with_tail(kubectl: Any) -> None:
    name = f"logs-{secrets.token_hex(3)}"
    apply_pod(kubectl, name, "for i in 1 2 3 4 5; do echo line-$i; done")
    try:
        wait_for(lambda: phase(kubectl, name) == "Succeeded", f"{name} to finish")
        r = kubectl("logs", name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [f"line-{i}" for i in range(1, 6)]
        r = kubectl("logs", name, "--tail", "2")
        assert r.stdout.split() == ["line-4", "line-5"]
        r = kubectl("logs", name, "--limit-bytes", "7")
        assert r.stdout == "line-1\n"
        if have(OLDEST):  # the log subresource is plain HTTP: every kubectl reads it
            r = kubectl("logs", name, "--tail", "1", minor=OLDEST)
            assert r.returncode == 0 and r.stdout.split() == ["line-5"], r.stderr
    finally:
        kubectl("delete", "pod", name, "--wait=false")


def test_pods_find_the_api_through_kubelets_service_variables(kubectl: Any) -> None:
    name = f"env-{secrets.token_hex(3)}"
    apply_pod(kubectl, name, "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT")
    try:
        wait_for(lambda: phase(kubectl, name) == "Succeeded", f"{name} to finish")
        assert kubectl("logs", name).stdout.strip() == "10.96.0.1:443"
    finally:
        kubectl("delete", "pod", name, "--wait=false")


def test_logs_follow_until_the_container_ends(kubectl: Any) -> None:
    name = f"follow-{secrets.token_hex(3)}"
    apply_pod(kubectl, name, "echo first; sleep 3; echo second")
    try:
        wait_for(lambda: phase(kubectl, name) in ("Running", "Succeeded"), f"{name} to run")
        r = kubectl("logs", "-f", name)  # returns only once the container has ended
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["first", "second"]
    finally:
        kubectl("delete", "pod", name, "--wait=false")


def test_logs_previous_of_a_crash_looping_container(kubectl: Any) -> None:
    name = f"crash-{secrets.token_hex(3)}"
    apply_pod(kubectl, name, "echo crashed-at-$(date +%s%N); exit 1", restart="Always")
    try:

        def restarted() -> bool:
            r = kubectl(
                "get", "pod", name, "-o", "jsonpath={.status.containerStatuses[0].restartCount}"
            )
            return r.stdout.strip().isdigit() and int(r.stdout) >= 1

        wait_for(restarted, f"{name} to restart", timeout=180)
        r = kubectl("logs", name, "--previous")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("crashed-at-"), r.stdout
    finally:
        kubectl("delete", "pod", name, "--wait=false")


def test_exec_with_stdin_and_exit_code(kubectl: Any) -> None:
    name = f"exec-{secrets.token_hex(3)}"
    apply_pod(kubectl, name, "sleep 300")
    try:
        wait_for(lambda: phase(kubectl, name) == "Running", f"{name} to run")
        r = kubectl(
            "exec",
            "-i",
            name,
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo err >&2; exit 3",
            stdin="hello from stdin\n",
        )
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert r.stdout == "HELLO FROM STDIN\n"
        assert "err" in r.stderr
        r = kubectl("exec", name, "--", "sh", "-c", "echo $HOSTNAME")
        assert r.returncode == 0 and r.stdout.strip() == name, r.stderr
        if have(29):  # SPDY only: a Status that says what to use
            r = kubectl("exec", name, "--", "true", minor=29)
            assert r.returncode != 0 and "WebSocket" in r.stderr, r.stderr
    finally:
        kubectl("delete", "pod", name, "--wait=false")


def test_errors_read_as_kubectl_users_know_them(kubectl: Any) -> None:
    r = kubectl("logs", "no-such-pod")
    assert r.returncode == 1
    # kubectl's own text for logs, as against kube-apiserver
    assert '(NotFound): pods "no-such-pod" not found in namespace "default"' in r.stderr
    r = kubectl("exec", "no-such-pod", "--", "true")
    assert r.returncode == 1 and "not found" in r.stderr


def test_the_node_api_answers_only_the_api_server(cluster: Any) -> None:
    """Without a certificate the TLS handshake fails; a certificate of the cluster CA
    without system:masters (what a pod could hold) is refused."""
    node_ip = cluster.ips[cluster.nodes[0]]
    url = f"https://{node_ip}:10250/healthz"
    ca = os.path.join(cluster.state().pki_dir, "ca.crt")
    r = subprocess.run(["curl", "-sS", "--cacert", ca, url], capture_output=True, text=True)
    assert r.returncode != 0
    d = tempfile.mkdtemp(prefix="corral-nodeapi-")
    try:
        for f in ("ca.crt", "ca.key"):
            shutil.copy(os.path.join(cluster.state().pki_dir, f), d)
        paths = pki.issue_client(d, "someone", "someone", ("developers",))
        args = ["--cert", paths.cert("someone"), "--key", paths.key("someone")]
        r = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca, *args, url],
            capture_output=True,
            text=True,
        )
        assert r.stdout == "403", (r.stdout, r.stderr)
        admin = pki.Paths(cluster.state().pki_dir)
        args = [
            "--cert",
            admin.cert(kubeconfig.KUBELET_CLIENT),
            "--key",
            admin.key(kubeconfig.KUBELET_CLIENT),
        ]
        r = subprocess.run(
            ["curl", "-sS", "--cacert", ca, *args, url], capture_output=True, text=True
        )
        assert r.stdout == "ok", (r.stdout, r.stderr)
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


def test_corral_logs_and_exec_reach_a_pod_on_another_machine(cluster: Any, kubectl: Any) -> None:
    """From a process that cannot see the node's processes (its own PID namespace, as
    on another machine), `corral exec` and `corral logs` go through the API server."""
    name = f"remote-{secrets.token_hex(3)}"
    apply_pod(kubectl, name, "echo remote-hello; sleep 300")
    try:
        wait_for(lambda: phase(kubectl, name) == "Running", f"{name} to run")
        away = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "corral"]
        r = subprocess.run(
            [*away, "exec", name, "--", "sh", "-c", "cat; echo $HOSTNAME; exit 5"],
            input="piped\n", capture_output=True, text=True, env=cluster.env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 5, r.stderr
        assert r.stdout.split() == ["piped", name]
        r = subprocess.run(
            [*away, "logs", name], capture_output=True, text=True, env=cluster.env, timeout=60
        )
        assert r.returncode == 0 and r.stdout.strip() == "remote-hello", r.stderr
    finally:
        kubectl("delete", "pod", name, "--wait=false")
