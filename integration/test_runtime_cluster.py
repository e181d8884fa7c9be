"""The pod runtime in a real `corral up` cluster: sandboxes, IPs, probes, logs, exec, delete."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
from typing import Any

import pytest

from corral.api.objects import Pod
from integration.cluster_helpers import wait_for
from integration.podcmd import POD_PYTHON

pytestmark = pytest.mark.slow

DEADLINE = 120.0


def get(cluster: Any, name: str) -> Pod | None:
    async def go() -> Pod | None:
        async with cluster.store() as s:
            return await s.get(Pod, name, "default")

    return asyncio.run(go())


def test_pods_on_every_node_run_answer_and_go_away(cluster: Any) -> None:
    sfx = secrets.token_hex(3)
    names = {node: f"rt-{i}-{sfx}" for i, node in enumerate(cluster.nodes)}

    async def create() -> None:
        async with cluster.store() as s:
            for node, name in names.items():
                await s.create(
                    Pod.model_validate(
                        {
                            "metadata": {"name": name, "labels": {"app": f"rt-{sfx}"}},
                            "spec": {
                                "nodeName": node,
                                "terminationGracePeriodSeconds": 1,
                                "containers": [
                                    {
                                        "name": "web",
                                        "env": [{"name": "WHO", "value": name}],
                                        "command": [POD_PYTHON, "-m", "http.server", "8080"],
                                        "ports": [{"containerPort": 8080, "name": "http"}],
                                        "readinessProbe": {
                                            "httpGet": {"port": "http"},
                                            "periodSeconds": 1,
                                        },
                                    }
                                ],
                            },
                        }
                    )
                )

    asyncio.run(create())
    try:
        pods = {
            node: wait_for(
                lambda n=name: (p := get(cluster, n)) is not None and p.ready and p, f"{name} Ready"
            )
            for node, name in names.items()
        }
        for node, p in pods.items():
            r = cluster.exec(node, "cat", "/run/corral/subnet.json")
            subnet = json.loads(r.stdout)["subnet"]
            assert ipaddress.ip_address(p.status.pod_ip) in ipaddress.ip_network(subnet)
            assert p.status.host_ip == cluster.ips[node]
            # The sandbox is a containerd-style named namespace in the node's /run/netns.
            assert any(
                f.startswith("cni-") for f in cluster.exec(node, "ls", "/run/netns").stdout.split()
            )
        # Each pod answers on its port, from its own node and from another node.
        first, other = cluster.nodes[0], cluster.nodes[1]
        for node in (first, other):
            ip = pods[first].status.pod_ip
            wait_for(
                lambda node=node, ip=ip: (
                    cluster.exec(
                        node,
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        f"http://{ip}:8080/",
                    ).stdout
                    == "200"
                ),
                f"{node} to reach {ip}",
            )
        name = names[first]
        r = cluster.corral(
            "exec", name, "--", "sh", "-c", "echo $WHO; hostname; grep nameserver /etc/resolv.conf"
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:2] == [name, name]
        assert "nameserver 10.96.0.10" in r.stdout
        logs = cluster.corral("logs", name)
        assert logs.returncode == 0 and '"GET / HTTP/1.1" 200' in logs.stdout, logs.stderr
        # Graceful delete through the CLI: the object goes once the node has cleaned up.
        r = cluster.corral("delete", "pod", name)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: get(cluster, name) is None, f"{name} deleted")
        ip = pods[first].status.pod_ip
        assert cluster.exec(other, "ping", "-c1", "-W1", ip).returncode != 0
    finally:

        async def delete() -> None:
            async with cluster.store() as s:
                for n in names.values():
                    await s.delete(Pod, n, "default")

        asyncio.run(delete())


def _manifest(name: str, node: str, sc: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "command": ["sleep", "3600"], "securityContext": sc}],
            },
        }
    )


def test_pods_cannot_touch_their_node_unless_they_ask(cluster: Any) -> None:
    """As a new user tries it: `corral run`, then `corral exec` into the pod."""
    sfx = secrets.token_hex(3)
    app, netadmin, priv = f"sb-{sfx}", f"sb-net-{sfx}", f"sb-priv-{sfx}"
    node = cluster.nodes[0]
    r = cluster.corral("run", app, "--command", "--", "sleep", "3600")
    assert r.returncode == 0, r.stderr
    for name, sc in (
        (netadmin, {"capabilities": {"add": ["NET_ADMIN"]}}),
        (priv, {"privileged": True}),
    ):
        r = cluster.corral("apply", "-f", "-", input=_manifest(name, node, sc))
        assert r.returncode == 0, r.stderr
    try:
        name = app  # `corral run` without --replicas makes one Pod of that name
        for n in (name, netadmin, priv):
            wait_for(lambda n=n: (p := get(cluster, n)) is not None and p.ready, f"{n} Ready")
        pod = get(cluster, name)
        assert pod is not None
        pod_node = pod.spec.node_name or ""

        def sh(pod_name: str, script: str) -> Any:
            return cluster.corral("exec", pod_name, "--", "sh", "-c", script)

        r = sh(name, "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status")
        assert r.returncode == 0 and r.stdout.split() == [
            "CapEff:",
            "00000000a80425fb",
            "NoNewPrivs:",
            "1",
        ], r
        r = sh(name, "mount -t tmpfs x /mnt")
        assert r.returncode != 0 and "permission denied" in r.stderr, r
        r = sh(name, "ip addr add 10.9.9.9/32 dev eth0")
        assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
        sock = os.path.join(cluster.state_dir, "nodes", pod_node, "run", "cni.sock")
        assert os.path.exists(sock)  # the CNI daemon's socket, as the host sees it
        root = os.path.dirname(cluster.state_dir)  # $CORRAL_STATE_DIR
        for path in (sock, "/run/corral/cni.sock"):  # no socket to drive, by any path
            r = sh(name, f"ls -A {path}")
            assert r.stdout == "" and r.returncode != 0, (path, r)
        for path in (cluster.state_dir, root, "/var/lib/corral"):
            # Hidden: absent, or (where the node has it) an empty read-only tmpfs.
            r = sh(name, f"ls -A {path}")
            assert r.stdout == "", (path, r)
        for path in ("/run/corral", "/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni", "/run/netns"):
            assert sh(name, f"ls -A {path} 2>/dev/null").stdout == "", path
        r = sh(name, "echo x > /etc/x")
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r
        # The pods that asked for more get it.
        r = sh(netadmin, "ip addr add 10.9.9.9/32 dev eth0 && ip -o addr show dev eth0")
        assert r.returncode == 0 and "10.9.9.9/32" in r.stdout, r
        r = sh(priv, "mount -t tmpfs x /mnt && umount /mnt && ls /run/corral")
        assert r.returncode == 0 and "cni.sock" in r.stdout, r
    finally:
        names = (app, netadmin, priv)
        cluster.corral("delete", "pod", *names, "--ignore-not-found", "--grace-period", "1")
        wait_for(
            lambda: all(get(cluster, n) is None for n in names), "the sandbox test's pods to go"
        )


def test_host_network_pod_with_an_init_container(cluster: Any) -> None:
    """A system-pod shape: hostNetwork, an init container first, served on the node's IP."""
    sfx = secrets.token_hex(3)
    name, node, other = f"hn-{sfx}", cluster.nodes[0], cluster.nodes[1]
    port = 20000 + int(sfx, 16) % 10000
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "hostNetwork": True,
            "terminationGracePeriodSeconds": 2,
            "initContainers": [{"name": "setup", "command": ["sh", "-c", "echo set up"]}],
            "containers": [
                {
                    "name": "web",
                    "command": [POD_PYTHON, "-m", "http.server", str(port)],
                    "ports": [{"containerPort": port}],
                    "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
                    "lifecycle": {"preStop": {"exec": {"command": ["true"]}}},
                }
            ],
        },
    }
    r = cluster.corral("apply", "-f", "-", input=json.dumps(manifest))
    assert r.returncode == 0, r.stderr
    try:
        p = wait_for(lambda: (p := get(cluster, name)) and p.ready and p, f"{name} Ready")
        assert p.status.pod_ip == p.status.host_ip == cluster.ips[node]
        assert [c.state["terminated"]["reason"] for c in p.status.init_container_statuses] == [
            "Completed"
        ]
        # On the node's own address, from another node: no CNI, no pod subnet.
        r = cluster.exec(
            other, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            f"http://{cluster.ips[node]}:{port}/",
        )  # fmt: skip
        assert r.stdout == "200", r
        r = cluster.corral("get", "pod", name)
        assert r.returncode == 0 and "Running" in r.stdout, r
        assert cluster.corral("logs", name, "-c", "setup").stdout == "set up\n"
    finally:
        cluster.corral("delete", "pod", name, "--ignore-not-found", "--grace-period", "2")
        wait_for(lambda: get(cluster, name) is None, f"{name} deleted")
