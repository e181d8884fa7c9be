"""Every daemon `corral up` starts serves /metrics and /healthz; node Ready follows health.

The broken-CNI case is what a user (or a cleanup script) can do to a node: the
CNI socket path is removed and a directory takes its place, so no runtime can
reach the node's CNI server and the server cannot serve the path again. The
node must turn NotReady naming the component and the cause, `corral status`
must report it, and once the directory is gone the node recovers by itself.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from corral.api.objects import Node
from corral.cluster import daemons
from tests import kit

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    return kit.wait_for(check, what, timeout, interval=0.5)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    ]


def test_every_daemon_answers_metrics_and_healthz(cluster) -> None:  # type: ignore[no-untyped-def]
    s = cluster.state()
    seen = set()
    for rec in s.daemons:
        d = daemons.by_name(rec.role.removeprefix("daemon:"))
        assert d is not None and d.port is not None, rec.role
        ip = cluster.ips[rec.node]
        code, body = _get(f"http://{ip}:{d.port}/healthz")
        assert (code, body) == (200, "ok\n"), f"{d.name} on {rec.node}: {body}"
        code, body = _get(f"http://{ip}:{d.port}/readyz?verbose")
        assert code == 200, f"{d.name} on {rec.node}: {body}"
        code, text = _get(f"http://{ip}:{d.port}/metrics")
        assert code == 200
        info = _samples(text, "corral_daemon_info")
        assert info == [({"daemon": d.name, "node": rec.node}, 1.0)]
        assert _samples(text, "corral_etcd_up") == [({}, 1.0)]
        healthy = _samples(text, "corral_component_healthy")
        assert healthy and all(v == 1.0 for _, v in healthy), healthy
        requests = _samples(text, "corral_etcd_request_duration_seconds_count")
        assert sum(v for _, v in requests) > 0
        if d.name == "node":
            pools = _samples(text, "corral_ipam_pool_size_addresses")
            assert len(pools) == 1 and pools[0][1] > 0
        seen.add((d.name, rec.node))
    assert {n for n, _ in seen} == {"apiserver", "node", "proxy", "scheduler", "controllers"}
    assert sum(n == "apiserver" for n, _ in seen) == 1  # on node-1, as `corral up` starts it
    assert sum(n == "node" for n, _ in seen) == len(cluster.nodes)
    assert sum(n == "proxy" for n, _ in seen) == len(cluster.nodes)
    # nothing listens on every address: the node daemon is bound to its own
    r = cluster.exec("node-1", "ss", "-Hltn", f"sport = :{daemons.PORTS['node']}")
    local = [line.split()[3] for line in r.stdout.splitlines()]
    assert local == [f"{cluster.ips[cluster.node('node-1')]}:{daemons.PORTS['node']}"], r.stdout

    r = cluster.corral("status", "--name", cluster.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "UNHEALTHY" not in r.stdout


def _ready(cluster, node: str) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    async def go() -> tuple[str, str, str]:
        async with cluster.store() as store:
            n = await store.get(Node, node)
        c = n.status.condition("Ready") if n else None
        return (c.status, c.reason or "", c.message or "") if c else ("", "", "")

    return asyncio.run(go())


def test_node_with_broken_cni_socket_turns_not_ready_and_back(cluster) -> None:  # type: ignore[no-untyped-def]
    node = cluster.node("node-3")
    sock = "/run/corral/cni.sock"
    assert _ready(cluster, node)[0] == "True"
    r = cluster.exec(node, "sh", "-c", f"rm -f {sock} && mkdir {sock}")
    assert r.returncode == 0, r.stderr
    try:
        _wait(lambda: _ready(cluster, node)[0] == "False", "Ready=False")
        _, reason, message = _ready(cluster, node)
        assert reason == "ComponentFailing"
        assert message.startswith("cni: ") and sock in message, message

        port = daemons.PORTS["node"]
        code, body = _get(f"http://{cluster.ips[node]}:{port}/healthz?verbose")
        assert code == 503 and "[-]component/cni failed" in body, body

        r = cluster.corral("status", "--name", cluster.name)
        assert r.returncode == 1
        assert "node=UNHEALTHY" in r.stdout and f"node on {node}: component/cni" in r.stdout
    finally:
        cluster.exec(node, "rmdir", sock)  # the repair, also when the test failed
    _wait(lambda: _ready(cluster, node)[0] == "True", "Ready=True again", timeout=180)
    code, _ = _get(f"http://{cluster.ips[node]}:{daemons.PORTS['node']}/healthz")
    assert code == 200
    assert "CNI daemon serving" in cluster.log("node", node).rsplit("removed or replaced", 1)[-1]


def _caps(pid: int) -> dict[str, int]:
    """CapEff/CapPrm/CapBnd/NoNewPrivs of every thread of `pid`, or-ed together."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
                    out[key] = out.get(key, 0) | int(value.split()[0], 16)
                elif key == "NoNewPrivs":
                    out[key] = int(value.split()[0])
    return out


def test_control_plane_daemons_run_without_capabilities(cluster) -> None:  # type: ignore[no-untyped-def]
    by_role = {r.role.removeprefix("daemon:"): r for r in cluster.state().daemons}
    for name in ("scheduler", "controllers"):
        caps = _caps(by_role[name].pid)  # nsenter execs: the record is the daemon
        assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == caps["CapAmb"] == 0, (
            name,
            caps,
        )
        assert caps["NoNewPrivs"] == 1, (name, caps)
    assert _caps(by_role["node"].pid)["CapEff"] != 0  # the node agent needs them
    # the service proxy keeps exactly what it uses
    from corral.daemon.privileges import KEEP, mask

    want = mask(KEEP["proxy"] or frozenset())
    proxy = _caps(by_role["proxy"].pid)
    assert proxy["CapEff"] == proxy["CapPrm"] == proxy["CapBnd"] == want, proxy
    assert proxy["NoNewPrivs"] == 1, proxy
