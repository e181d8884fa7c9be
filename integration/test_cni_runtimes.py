"""Real CNI runtimes on a `corral up` node: podman 4 (CNI backend) and containerd 1.6
(`ctr run --cni`) with corral's conflist.

Each runtime's container gets an IP from its node's subnet (held in etcd under its
own container ID), reaches a pod on the other node by that IP (the server logs it),
reaches a Service VIP through the node's proxy, and gives the IP back when the
runtime lets go of it. A container lost behind its runtime's back (state wiped, netns
gone) leaks nothing either: corral's reaper releases what no DEL ever will.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from corral.api.objects import IPAllocation, Pod, Service
from integration import cni_runtimes
from integration.cluster_helpers import wait_for
from integration.clusters import LocalCluster, local_cluster
from integration.podcmd import POD_PYTHON

pytestmark = pytest.mark.slow

# The client node (runtimes run here) and the server pod's node.
CLIENT, SERVER = "node-1", "node-2"
SFX = secrets.token_hex(3)
WEB, SVC = f"rtweb-{SFX}", f"rtsvc-{SFX}"


def _need(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/bootstrap.sh installs them)")


@pytest.fixture(scope="module")
def rt_cluster() -> Iterator[LocalCluster]:
    with local_cluster(2, "--dns-replicas", "0") as c:  # no DNS needed: a faster up
        yield c


@pytest.fixture(scope="module")
def tmp() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="corral-rt-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def rootfs(tmp: str) -> str:
    _need("busybox")
    return cni_runtimes.busybox_rootfs(os.path.join(tmp, "rootfs"))


def _run(cluster: LocalCluster, fn: Any) -> Any:
    async def go() -> Any:
        async with cluster.store() as s:
            return await fn(s)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def web(rt_cluster: LocalCluster) -> Iterator[dict[str, str]]:
    """A pod on the server node (python's http.server logs each client's address) and
    a Service in front of it: {"ip": pod IP, "vip": the Service's cluster IP}."""
    c = rt_cluster
    pod = Pod.model_validate(
        {
            "metadata": {"name": WEB, "labels": {"app": WEB}},
            "spec": {
                "nodeName": c.node(SERVER),
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "web",
                        "command": [POD_PYTHON, "-m", "http.server", "8080"],
                        "ports": [{"containerPort": 8080, "name": "web"}],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                    }
                ],
            },
        }
    )
    svc = Service(
        metadata={"name": SVC},
        spec={"selector": {"app": WEB}, "ports": [{"port": 80, "targetPort": "web"}]},
    )
    _run(c, lambda s: s.create(pod))
    _run(c, lambda s: s.create(svc))
    try:
        p = wait_for(
            lambda: (p := _run(c, lambda s: s.get(Pod, WEB, "default"))) and p.ready and p,
            f"{WEB} Ready",
        )

        def vip_of() -> str | None:
            svc = _run(c, lambda s: s.get(Service, SVC, "default"))
            return svc and svc.spec.cluster_ip

        vip = wait_for(vip_of, f"{SVC}'s cluster IP")

        wait_for(
            lambda: (
                c.exec(
                    CLIENT, "curl", "-s", "-m", "2", "-o", "/dev/null", f"http://{vip}/"
                ).returncode
                == 0
            ),
            f"{vip} to answer from {CLIENT}",
        )
        yield {"ip": p.status.pod_ip, "vip": vip}
    finally:
        _run(c, lambda s: s.delete(Service, SVC, "default"))
        c.corral("delete", "pod", WEB, "--ignore-not-found", "--grace-period", "1")


def _subnet(cluster: LocalCluster, node: str) -> ipaddress.IPv4Network:
    r = cluster.exec(node, "cat", "/run/corral/subnet.json")
    return ipaddress.ip_network(json.loads(r.stdout)["subnet"])


def _allocations(cluster: LocalCluster) -> dict[str, IPAllocation]:
    """Every IP held in etcd, by container ID."""

    async def go(s: Any) -> dict[str, IPAllocation]:
        kvs, _ = await s.list_raw("/corral/v1/ipam/")
        out = {}
        for kv in kvs:
            if "/ips/" in kv.key:
                a = IPAllocation.model_validate_json(kv.value)
                out[a.container_id] = a
        return out

    return _run(cluster, go)


def _eth0_ip(out: str) -> str:
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/\d+", out)
    assert m, out
    return m.group(1)


def _served(cluster: LocalCluster, ip: str) -> bool:
    """Did the web pod log a request from `ip` (the client address it saw)?"""
    return f"\n{ip} - -" in "\n" + cluster.corral("logs", WEB).stdout


def _check_traffic(cluster: LocalCluster, web: dict[str, str], ip: str, run: Any) -> None:
    """From inside the container: the pod on the other node, then the Service VIP."""
    r = run("wget", "-q", "-O", "/dev/null", f"http://{web['ip']}:8080/")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _served(cluster, ip), f"{WEB} to log a request from {ip}", timeout=20)
    r = run("wget", "-q", "-O", "-", f"http://{web['vip']}/")
    assert r.returncode == 0 and "Directory listing" in r.stdout, (r.stdout, r.stderr)


def _released(cluster: LocalCluster, cid: str) -> bool:
    return cid not in _allocations(cluster)


def _no_cache(cluster: LocalCluster, cid: str) -> bool:
    r = cluster.exec(CLIENT, "ls", "/var/lib/cni/results")
    return cid not in r.stdout


# ------------------------------------------------------------------ podman


@pytest.fixture(scope="module")
def podman(rt_cluster: LocalCluster, tmp: str) -> Iterator[cni_runtimes.Podman]:
    _need("podman", "runc", "conmon")
    pm = cni_runtimes.Podman(rt_cluster, CLIENT, os.path.join(tmp, "podman"))
    try:
        yield pm
    finally:
        pm.cleanup()


def test_podman_container_on_corral_network(
    rt_cluster: LocalCluster, podman: cni_runtimes.Podman, rootfs: str, web: dict[str, str]
) -> None:
    c = rt_cluster
    r = podman("network", "ls", "--format", "{{.Name}}")
    assert "corral" in r.stdout.split(), r  # read from the node's /etc/cni/net.d
    cid = podman.run_detached(f"pm-{SFX}", rootfs, "sleep", "600")
    ip = _eth0_ip(podman("exec", cid, "ip", "-o", "-4", "addr", "show", "eth0").stdout)
    assert ipaddress.ip_address(ip) in _subnet(c, CLIENT)
    held = _allocations(c)[cid]
    assert (str(held.ip), held.ifname, held.node_name) == (ip, "eth0", c.node(CLIENT))
    assert held.plugin == "corral-cni" and held.pod_name == f"pm-{SFX}"
    _check_traffic(c, web, ip, lambda *cmd: podman("exec", cid, *cmd))
    # podman's DEL: rm of the running container tears its network down.
    r = podman("rm", "-f", "-t", "0", cid)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _released(c, cid), f"podman rm to release {ip}", 30)
    assert _no_cache(c, cid)
    assert c.exec(CLIENT, "ping", "-c1", "-W1", ip).returncode != 0


def test_podman_container_lost_behind_its_back_leaks_no_ip(
    rt_cluster: LocalCluster, podman: cni_runtimes.Podman, rootfs: str, tmp: str
) -> None:
    c = rt_cluster
    lost = cni_runtimes.Podman(c, CLIENT, os.path.join(tmp, f"podman-lost-{SFX}"))
    try:
        cid = lost.run_detached(f"pm-lost-{SFX}", rootfs, "sleep", "600")
        ip = str(_allocations(c)[cid].ip)
        sandbox = lost.inspect(cid, "{{.NetworkSettings.SandboxKey}}")
        pids = lost.inspect(cid, "{{.State.ConmonPid}} {{.State.Pid}}").split()
        assert sandbox.startswith("/run/netns/") and len(pids) == 2, (sandbox, pids)
        # conmon first (so it runs no `podman container cleanup`), then the container;
        # then the pinned netns and all of podman's state go.
        for pid in pids:
            os.kill(int(pid), 9)
        r = c.exec(CLIENT, "sh", "-c", f"umount {sandbox} && rm {sandbox}")
        assert r.returncode == 0, r.stderr
        shutil.rmtree(lost.root)
        assert not _released(c, cid)  # nobody sent DEL
        # corral's reaper: its veth went with the netns, so the IP is released.
        wait_for(lambda: _released(c, cid), f"{ip} of the lost container to be released", 90)
        wait_for(lambda: _no_cache(c, cid), "its cached CNI result to go", 30)
        assert "lost its network namespace without a DEL" in c.log("node", CLIENT)
        # The next runtime call works as if nothing happened.
        cid2 = podman.run_detached(f"pm-after-{SFX}", rootfs, "sleep", "600")
        assert cid2 in _allocations(c)
        assert podman("rm", "-f", "-t", "0", cid2).returncode == 0
        wait_for(lambda: _released(c, cid2), "podman rm to release its IP", 30)
    finally:
        cni_runtimes.remove_cgroups(lost.cgroup)


# ------------------------------------------------------------------ containerd

IMAGE = "corral.test/busybox:1"


@pytest.fixture(scope="module")
def ctrd(rt_cluster: LocalCluster, tmp: str, rootfs: str) -> Iterator[cni_runtimes.Containerd]:
    _need("containerd", "ctr", "runc", "containerd-shim-runc-v2")
    archive = cni_runtimes.oci_archive(rootfs, os.path.join(tmp, "busybox.oci.tar"), IMAGE)
    with cni_runtimes.containerd(rt_cluster, CLIENT, os.path.join(tmp, "containerd")) as cd:
        r = cd.ctr("image", "import", archive)
        assert r.returncode == 0, r.stderr
        yield cd


def test_containerd_ctr_run_cni(
    rt_cluster: LocalCluster, ctrd: cni_runtimes.Containerd, web: dict[str, str]
) -> None:
    c = rt_cluster
    # Detached: the task's own netns (/proc/<pid>/ns/net), ADDed by ctr through libcni.
    name = f"ctr-{SFX}"
    cid = f"default-{name}"  # ctr's CNI container ID: <namespace>-<id>
    r = ctrd.ctr("run", "--cni", "-d", IMAGE, name, "sleep", "600")
    assert r.returncode == 0, r.stderr
    n = [0]

    def in_task(*cmd: str) -> Any:
        n[0] += 1
        return ctrd.ctr("task", "exec", "--exec-id", f"t{n[0]}", name, *cmd)

    ip = _eth0_ip(in_task("ip", "-o", "-4", "addr", "show", "eth0").stdout)
    assert ipaddress.ip_address(ip) in _subnet(c, CLIENT)
    held = _allocations(c)[cid]
    assert (str(held.ip), held.plugin) == (ip, "corral-cni")
    _check_traffic(c, web, ip, in_task)
    # ctr 1.6 sends no DEL for a detached task (only `ctr run --rm` in the foreground
    # does): the task's namespace dies with it, and corral's reaper releases the IP.
    assert ctrd.ctr("task", "kill", "-s", "KILL", name).returncode == 0
    wait_for(lambda: ctrd.ctr("task", "delete", name).returncode == 0, "the task to stop", 30)
    assert ctrd.ctr("container", "rm", name).returncode == 0
    wait_for(lambda: _released(c, cid), f"{ip} of the deleted ctr task to be released", 90)
    wait_for(lambda: _no_cache(c, cid), "its cached CNI result to go", 30)
    # Foreground with --rm: ctr DELs itself when the task exits.
    name = f"ctr-rm-{SFX}"
    script = (
        "ip -o -4 addr show eth0 && "
        f"wget -q -O /dev/null http://{web['ip']}:8080/ && "
        f"wget -q -O - http://{web['vip']}/ | grep -c 'Directory listing'"
    )
    r = ctrd.ctr("run", "--cni", "--rm", IMAGE, name, "sh", "-c", script)
    assert r.returncode == 0, (r.stdout, r.stderr)
    ip = _eth0_ip(r.stdout)
    assert ipaddress.ip_address(ip) in _subnet(c, CLIENT)
    wait_for(lambda: _served(c, ip), f"{WEB} to log a request from {ip}", timeout=20)
    assert _released(c, f"default-{name}")
    assert _no_cache(c, f"default-{name}")
