"""corral works wherever it is checked out: `corral up`, cluster DNS and a pod's lookup,
run from a copy of this checkout under /tmp, which every pod has private (as /root and
/home are hidden), bootstrapped as a new user would (scripts/bootstrap.sh).

The DNS pods run the copy's venv interpreter; the node runtime mounts the copy's venv and
package folders into them alone (runtime/corralfiles.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.cluster import dnsworkload, down, local
from integration.cluster_helpers import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _files(repo: Path) -> list[str]:
    """The checkout's files as git sees them (tracked and new, not ignored: no venv)."""
    r = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=60,
    )
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.decode(errors='replace').strip()}")
    return [f for f in r.stdout.decode().split("\0") if f]


@pytest.fixture(scope="module")
def checkout() -> Iterator[Path]:
    """A copy of this checkout under /tmp with its own venv."""
    if os.geteuid() != 0:
        pytest.skip("whole-cluster tests need root")
    files = _files(REPO)
    dst = Path(tempfile.mkdtemp(prefix="corral-any-checkout-", dir="/tmp"))
    try:
        for rel in files:
            src = REPO / rel
            if src.is_file():  # a tracked file deleted in the work tree is skipped
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / rel)
        env = {k: v for k, v in os.environ.items() if k != "CORRAL_VENV"}
        r = subprocess.run(
            [str(dst / "scripts" / "bootstrap.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, f"bootstrap failed:\n{r.stderr[-3000:]}"
        yield dst
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def test_up_cluster_dns_and_a_pod_from_a_checkout_under_tmp(checkout: Path) -> None:
    if not dnsworkload.server_available():
        pytest.skip("this corral has no `corral dns` command, so `corral up` runs no DNS")
    root = tempfile.mkdtemp(prefix="corral-it-")
    name = "ck" + secrets.token_hex(3)
    env = dict(os.environ, CORRAL_STATE_DIR=root, CORRAL_CLUSTER=name)
    for k in ("CORRAL_ETCD", "CORRAL_VENV"):
        env.pop(k, None)
    corral_bin = str(checkout / ".venv" / "bin" / "corral")

    def corral(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [corral_bin, *args],
            env=env,
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    try:
        wait = os.environ.get("CORRAL_TEST_READY_TIMEOUT", "120")
        r = corral(
            "up", "--name", name, "--nodes", "2",
            "--underlay-cidr", local.unused_underlay_cidr(), "--wait", wait,
            timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, f"corral up from {checkout} failed:\n{r.stderr}{r.stdout}"

        def dns_ready() -> list:
            r = corral("get", "endpoints", "dns", "-n", dnsworkload.NAMESPACE, "-o", "json")
            subsets = json.loads(r.stdout).get("subsets", []) if r.returncode == 0 else []
            return [a for s in subsets for a in s.get("addresses", [])]

        wait_for(dns_ready, "a ready cluster DNS replica", 180)
        r = corral("get", "pods", "-n", dnsworkload.NAMESPACE, "-o", "json")
        assert r.returncode == 0, r.stderr
        dns_pods = json.loads(r.stdout)["items"]
        assert dns_pods, r.stdout
        for p in dns_pods:  # the copy's own interpreter, hidden from pods but mounted
            assert p["spec"]["containers"][0]["command"][0].startswith(f"{checkout}/"), p

        manifest = (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: client}\n"
            "spec:\n  terminationGracePeriodSeconds: 1\n"
            '  containers:\n  - {name: c, command: [sleep, "3600"]}\n'
        )
        r = subprocess.run(
            [corral_bin, "apply", "-f", "-"],
            env=env,
            input=manifest,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr

        def client_running() -> bool:
            r = corral("get", "pod", "client", "-o", "json")
            return r.returncode == 0 and json.loads(r.stdout)["status"].get("phase") == "Running"

        wait_for(client_running, "the client pod to run", 120)
        r = corral("get", "service", "dns", "-n", dnsworkload.NAMESPACE, "-o", "json")
        vip = json.loads(r.stdout)["spec"]["clusterIP"]
        fqdn = f"{dnsworkload.NAME}.{dnsworkload.NAMESPACE}.svc.cluster.local"
        r = corral("exec", "client", "--", "getent", "ahostsv4", fqdn)
        assert r.returncode == 0 and r.stdout.split()[0] == vip, r.stdout + r.stderr
        # The ordinary pod sees nothing of the copy (its /tmp is its own).
        r = corral("exec", "client", "--", "ls", "-A", str(checkout))
        assert r.stdout == "", r.stdout
    finally:  # in-process, as integration/clusters.py: works even if the copy is broken
        down.down(name, os.path.join(root, name), progress=lambda _: None)
        shutil.rmtree(root, ignore_errors=True)
