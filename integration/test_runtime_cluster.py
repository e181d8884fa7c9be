"""The pod runtime in a real `corral up` cluster: sandboxes, IPs, probes, logs, exec, delete."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import sys
from typing import Any

import pytest
from cluster_helpers import wait_for

from corral.api.objects import Pod

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
                                        "command": [sys.executable, "-m", "http.server", "8080"],
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
