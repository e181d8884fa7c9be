"""`corral net` on a real 3-node cluster: check (and --fix), trace, ipam, services, capture.

One cluster for the module, started with the daemons' own repairs slowed down
(`CORRAL_NODE_KERNEL_EVENTS=off`, `CORRAL_NODE_RESYNC=3600`,
`CORRAL_PROXY_SYNC_PERIOD=3600`): a difference made by hand then stays until
`corral net check --fix` repairs it, instead of being repaired by the agent
within milliseconds, so each case can see `check` report exactly what it broke.
Pods: three `http.server`s behind the `web` Service (ClientIP affinity; they log
each client's address) and one idle client pod.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.api.store import PREFIX, SUBNETS_PREFIX
from integration.cluster_helpers import pods_of, wait_for
from integration.clusters import LocalCluster, local_cluster

pytestmark = pytest.mark.slow

SLOW_REPAIRS = {
    "CORRAL_NODE_KERNEL_EVENTS": "off",
    "CORRAL_NODE_RESYNC": "3600",
    "CORRAL_PROXY_SYNC_PERIOD": "3600",
}
SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {run: web}
  ports: [{port: 80, targetPort: 8080}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
"""


@pytest.fixture(scope="module")
def net() -> Iterator[LocalCluster]:
    saved = {k: os.environ.get(k) for k in SLOW_REPAIRS}
    os.environ.update(SLOW_REPAIRS)
    try:
        with local_cluster(3) as c:
            _deploy(c)
            yield c
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr + r.stdout
    return r


def _deploy(c: LocalCluster) -> None:
    _ok(
        c.corral(
            "run", "web", "--replicas", "3", "--port", "8080",
            "--command", "--", "python3", "-m", "http.server", "8080",
        )
    )  # fmt: skip
    _ok(c.corral("run", "client", "--command", "--", "sleep", "infinity"))
    _ok(c.corral("apply", "-f", "-", input=SERVICE))

    def running() -> bool:
        pods = pods_of(c, "web") + pods_of(c, "client")
        return len(pods) == 4 and all(
            p["status"].get("phase") == "Running" and p["status"].get("podIP") for p in pods
        )

    wait_for(running, "web and client pods Running", timeout=180)

    def endpoints() -> bool:
        r = c.corral("get", "endpoints", "web")
        return r.returncode == 0 and r.stdout.count(":8080") == 3

    wait_for(endpoints, "3 endpoints behind web")
    # the proxies and fast paths have caught up once `check` is clean
    wait_for(lambda: c.corral("net", "check").returncode == 0, "a clean corral net check", 60, 1)


def _json(r: subprocess.CompletedProcess) -> Any:
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def _pod(c: LocalCluster, app: str, index: int = 0) -> dict:
    return sorted(pods_of(c, app), key=lambda p: p["metadata"]["name"])[index]


def _check(c: LocalCluster) -> list[dict]:
    r = c.corral("net", "check", "-o", "json")
    return _json(r)["findings"]


def test_a_healthy_cluster_reports_nothing(net: LocalCluster) -> None:
    r = net.corral("net", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing differs" in r.stdout
    assert _check(net) == []


def test_trace_pod_to_pod_across_nodes(net: LocalCluster) -> None:
    client = _pod(net, "client")
    far = next(
        p for p in pods_of(net, "web") if p["spec"]["nodeName"] != client["spec"]["nodeName"]
    )
    r = net.corral(
        "net", "trace", client["metadata"]["name"], f"{far['metadata']['name']}:8080", "-o", "json"
    )
    doc = _json(r)
    steps = {h["step"]: h for h in doc["hops"]}
    assert r.returncode == 0 and doc["ok"], doc
    assert set(steps) >= {
        "source pod",
        "routing",
        "vxlan encap",
        "destination node",
        "destination pod",
    }
    assert all(h["status"] == "confirmed" for h in doc["hops"]), doc["hops"]
    assert steps["destination node"]["node"] == far["spec"]["nodeName"]
    assert far["status"]["podIP"] in steps["vxlan encap"]["seen"]  # inner dst, decoded on the wire
    assert (
        net.ips[far["spec"]["nodeName"]] in steps["vxlan encap"]["decision"]
    )  # remote underlay IP
    assert doc["probe"]["result"] == "connected"


def test_trace_service_with_affinity_names_the_backend_that_served(net: LocalCluster) -> None:
    client = _pod(net, "client")
    cip = client["status"]["podIP"]
    svc = _json(net.corral("get", "svc", "web", "-o", "json"))
    vip = svc["spec"]["clusterIP"]
    code = f"import urllib.request; print(urllib.request.urlopen('http://{vip}/').status)"
    _ok(net.corral("exec", client["metadata"]["name"], "--", "python3", "-c", code))

    def served_by() -> str | None:
        for p in pods_of(net, "web"):
            r = net.corral("logs", p["metadata"]["name"])
            if cip in r.stdout + r.stderr:
                return p["status"]["podIP"]
        return None

    backend = wait_for(served_by, "the server log naming the client")
    doc = _json(net.corral("net", "trace", client["metadata"]["name"], "web", "-o", "json"))
    service = next(h for h in doc["hops"] if h["step"] == "service")
    assert "affinity hit" in service["decision"], service
    assert doc["planned_backend"] == f"{backend}:8080", doc
    assert doc["backend"] == f"{backend}:8080", doc  # what conntrack says the probe used
    assert doc["ok"], doc
    # and the node's table shows the affinity entry with its age
    table = _json(net.corral("net", "services", "--node", client["spec"]["nodeName"], "-o", "json"))
    [row] = [s for s in table[client["spec"]["nodeName"]]["services"] if s["vip"] == vip]
    assert any(a["client"] == cip and a["backend"] == f"{backend}:8080" for a in row["affinity"])


def _lease(net: LocalCluster, node: str) -> dict:
    async def go() -> dict:
        async with net.store() as s:
            kvs, _ = await s.list_raw(SUBNETS_PREFIX)
            return next(d for kv in kvs if (d := json.loads(kv.value))["nodeName"] == node)

    return asyncio.run(go())


def _break_fdb(net: LocalCluster) -> tuple[str, str]:
    a, b = net.nodes[0], net.nodes[1]
    lease = _lease(net, b)
    _ok(
        net.exec(
            a,
            "bridge",
            "fdb",
            "del",
            lease["vtepMAC"],
            "dev",
            "corral.1",
            "dst",
            lease["publicIP"],
            "self",
        )
    )
    return a, f"FDB entry {lease['vtepMAC']} -> {lease['publicIP']}"


def _break_mtu(net: LocalCluster) -> tuple[str, str]:
    node = net.nodes[2]
    _ok(net.exec(node, "ip", "link", "set", "dev", "corral.1", "mtu", "1300"))
    return node, "MTU is 1300"


def _break_fastpath(net: LocalCluster) -> tuple[str, str]:
    node = net.nodes[1]
    r = net.exec(node, "tc", "filter", "show", "dev", "eth0", "ingress")
    if "from_uplink" not in r.stdout:
        pytest.skip("no eBPF fast path on this machine (kernel datapath)")
    _ok(net.exec(node, "tc", "filter", "del", "dev", "eth0", "ingress"))
    return node, "from_uplink is not attached to eth0"


def _break_proxy(net: LocalCluster) -> tuple[str, str]:
    node = net.nodes[2]
    save = _ok(net.exec(node, "iptables-save", "-t", "nat")).stdout
    web = [ln for ln in save.splitlines() if "default/web cluster IP" in ln]
    [chain] = set(re.findall(r"-j (CORRAL-SVC-\w+)", "\n".join(web)))
    _ok(net.exec(node, "iptables", "-t", "nat", "-F", chain))
    return node, f"chain {chain} has 0 rule(s)"


def _break_ipam(net: LocalCluster) -> tuple[str, str]:
    node = net.nodes[0]
    lease = _lease(net, node)
    pool = lease["subnet"].replace("/", "-")
    ip = lease["subnet"].rsplit(".", 1)[0] + ".200"
    cid = "feed" * 16
    alloc = {
        "ip": ip, "pool": pool, "containerID": cid, "ifname": "eth0", "nodeName": node,
        "podNamespace": "default", "podName": "long-gone", "createdAt": "2026-01-01T00:00:00Z",
    }  # fmt: skip

    async def go() -> None:
        async with net.store() as s:
            await s.put_raw(f"{PREFIX}/ipam/{pool}/ips/{ip}", json.dumps(alloc).encode())
            await s.put_raw(f"{PREFIX}/ipam/{pool}/owners/{cid}/eth0", ip.encode())

    asyncio.run(go())
    return node, f"leaked IP {ip}"


@pytest.mark.parametrize(
    "breaker", [_break_fdb, _break_fastpath, _break_proxy, _break_ipam, _break_mtu],
    ids=["fdb-entry", "fastpath-program", "proxy-chain", "leaked-ip", "mtu"],
)  # fmt: skip
def test_check_reports_exactly_what_was_broken_and_fix_repairs_it(
    net: LocalCluster, breaker: Any
) -> None:
    assert _check(net) == [], "the cluster was not clean before breaking it"
    node, what = breaker(net)
    findings = _check(net)
    assert len(findings) == 1, [x["what"] for x in findings]
    [f] = findings
    assert f["node"] == node and what in f["what"], f
    assert f["fix"], f  # a command that repairs it
    if breaker is _break_proxy:  # the node's service table says where it disagrees
        table = _json(net.corral("net", "services", "--node", node, "-o", "json"))
        rows = table[node]["services"]
        assert any(r["name"] == "default/web" and r["disagrees"] for r in rows), rows
    r = net.corral("net", "check", "--fix")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fixed:" in r.stdout
    assert _check(net) == []


def test_capture_decodes_a_ping_and_the_pcap_reads_back(net: LocalCluster, tmp_path: Any) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    client = _pod(net, "client")
    far = next(
        p for p in pods_of(net, "web") if p["spec"]["nodeName"] != client["spec"]["nodeName"]
    )
    pcap = tmp_path / "ping.pcap"
    cap = subprocess.Popen(
        [sys.executable, "-m", "corral", "net", "capture", "--node", client["spec"]["nodeName"],
         "--pod", client["metadata"]["name"], "-c", "4", "--duration", "60", "-w", str(pcap)],
        env=net.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert cap.stdout is not None
        first = cap.stdout.readline()
        assert "capturing on" in first, first + (
            cap.stderr.read() if cap.poll() is not None else ""
        )
        time.sleep(0.5)
        _ok(
            net.corral(
                "exec",
                client["metadata"]["name"],
                "--",
                "ping",
                "-c",
                "2",
                "-W",
                "2",
                far["status"]["podIP"],
            )
        )
        out, err = cap.communicate(timeout=60)
    finally:
        if cap.poll() is None:
            cap.kill()
    lines = [ln for ln in out.splitlines() if "VXLAN" in ln]
    assert any(
        "vni 1" in ln and "echo request" in ln and far["status"]["podIP"] in ln for ln in lines
    ), out
    assert cap.returncode == 0, err
    pkts = rdpcap(str(pcap))
    vx = [p for p in pkts if p.haslayer(VXLAN)]
    assert vx, [p.summary() for p in pkts]
    inner = vx[0][VXLAN].payload
    assert inner.haslayer(ICMP) and client["status"]["podIP"] in (inner[IP].src, inner[IP].dst)


def test_ipam_lists_allocations_with_their_pods(net: LocalCluster) -> None:
    doc = _json(net.corral("net", "ipam", "-o", "json"))
    owners = {a["ip"]: a["pod"] for p in doc["pools"] for a in p["allocations"]}
    for p in pods_of(net, "web"):
        assert owners[p["status"]["podIP"]] == f"default/{p['metadata']['name']}"
    assert doc["problems"] == []


def test_clear_errors_without_tracebacks(net: LocalCluster) -> None:
    r = net.corral("net", "trace", "no-such-pod", "web")
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = net.corral("net", "check", "--node", "no-such-node")
    assert r.returncode == 1 and "no such node" in r.stderr and "Traceback" not in r.stderr
    client = _pod(net, "client")
    r = net.corral(
        "net", "trace", client["metadata"]["name"], "web.default.svc.cluster.local:80", "--no-probe"
    )
    assert "Traceback" not in r.stderr
    if r.returncode != 0:  # no cluster DNS deployed (yet): said plainly
        assert "no cluster DNS answered" in r.stdout, r.stdout


def test_via_a_command_template_reaches_nodes_as_on_real_machines(net: LocalCluster) -> None:
    """`--via` is how `corral net` reaches real nodes (`ssh root@{ip}`); here the template
    is `corral node-exec`, which runs the same node-side commands inside each node."""
    env = dict(net.env, CORRAL_NET_PYTHON=sys.executable)
    via = f"{sys.executable} -m corral node-exec --name {net.name} {{node}} --"
    node = net.nodes[1]
    _ok(net.exec(node, "ip", "link", "set", "dev", "corral.1", "mtu", "1310"))
    r = subprocess.run(
        [sys.executable, "-m", "corral", "net", "check", "--via", via, "-o", "json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    findings = _json(r)["findings"]
    assert len(findings) == 1, [x["what"] for x in findings]
    [f] = findings
    assert f["node"] == node and "MTU is 1310" in f["what"]
    assert f["fix"].startswith(f"{sys.executable} -m corral node-exec"), f["fix"]
    r = subprocess.run(
        [sys.executable, "-m", "corral", "net", "check", "--via", via, "--fix"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert _check(net) == []


def test_trace_marks_the_first_hop_where_the_probe_stops(net: LocalCluster) -> None:
    """The kernel path without its FDB entry: the plan says where, the probe agrees."""
    client = _pod(net, "client")
    cnode = client["spec"]["nodeName"]
    far = next(p for p in pods_of(net, "web") if p["spec"]["nodeName"] != cnode)
    lease = _lease(net, far["spec"]["nodeName"])
    plan = _json(
        net.corral("net", "trace", client["metadata"]["name"], far["status"]["podIP"],
                   "--no-probe", "-o", "json")
    )  # fmt: skip
    veth = plan["hops"][0]["state"]["veth"]["name"]
    net.exec(cnode, "tc", "filter", "del", "dev", veth, "ingress")  # off the fast path
    _ok(net.exec(cnode, "bridge", "fdb", "del", lease["vtepMAC"], "dev", "corral.1",
                 "dst", lease["publicIP"], "self"))  # fmt: skip
    try:
        target = f"{far['metadata']['name']}:8080"
        r = net.corral(
            "net", "trace", client["metadata"]["name"], target, "--timeout", "2", "-o", "json"
        )  # fmt: skip
        doc = _json(r)
        assert r.returncode == 1 and not doc["ok"]
        assert doc["departure"] == "vxlan encap", doc["hops"]
        steps = {h["step"]: h for h in doc["hops"]}
        assert steps["source pod"]["status"] == "confirmed"
        assert (
            "kernel" in steps["routing"]["decision"]
            and "from_pod is not attached" in (steps["routing"]["decision"])
        )
        assert "MISSING" in steps["vxlan encap"]["decision"]
    finally:
        r = net.corral("net", "check", "--fix")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _check(net) == []
