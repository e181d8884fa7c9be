"""`corral up/down/status/node-exec` as a user runs them: real processes, kernel, etcd.

Every cluster here has a name and an underlay CIDR unique to the test run and
its state under a temporary CORRAL_STATE_DIR, so a user's own cluster is never
touched; a finalizer runs `corral down` even when a test fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from corral.api.objects import Node
from corral.api.store import Store, TLSFiles
from corral.cluster import down, underlay
from corral.cluster.local import unused_underlay_cidr
from corral.cluster.state import ClusterState, host_veth, load
from corral.node import netns
from corral.node.procs import ProcRecord, start_time

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


class Corral:
    """Runs the real `corral` command with a private state root."""

    def __init__(self, root: Path) -> None:
        self.env = dict(os.environ, CORRAL_STATE_DIR=str(root))
        self.env.pop("CORRAL_ETCD", None)
        self.root = root

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def state(self, name: str) -> ClusterState:
        s = load(str(self.root / name))
        assert s is not None, f"no state for {name}"
        return s


@pytest.fixture
def corral() -> Iterator[Corral]:
    # Not tmp_path: concurrent pytest runs prune old basetemp dirs, state and all.
    root = tempfile.mkdtemp(prefix="corral-test-cluster-")
    yield Corral(Path(root) / "state")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster_name(corral: Corral) -> Iterator[str]:
    """A unique cluster name, removed with `corral down` afterwards whatever happened."""
    name = "t" + secrets.token_hex(3)
    yield name
    # In-process, so cleanup works even while the CLI as a whole does not import.
    down.down(name, str(corral.root / name), progress=lambda _: None)


def _up(corral: Corral, name: str, *extra: str) -> ClusterState:
    r = corral("up", "--name", name, "--wait", "0", *extra)
    assert r.returncode == 0, r.stderr + r.stdout
    return corral.state(name)


def _all_procs(s: ClusterState) -> list[ProcRecord]:
    recs = [*s.daemons, *s.etcd_records, *([s.relay] if s.relay else [])]
    return recs + [n.holder for n in s.nodes if n.holder]


def _assert_gone(corral: Corral, s: ClusterState) -> None:
    assert not [n for n in netns.list_names(f"{s.name}-")], "namespaces left behind"
    assert host_veth(s.name) not in [i for i, _ in underlay.host_networks()]
    assert not os.path.exists(f"/sys/class/net/{host_veth(s.name)}"), "host veth left"
    alive = [r for r in _all_procs(s) if r.alive()]
    assert not alive, f"processes left: {alive}"
    assert not os.path.exists(s.state_dir), "state dir left"
    with open("/proc/self/mountinfo") as f:
        assert s.state_dir not in f.read(), "mounts left in the host namespace"
    from corral.ebpf import loader

    assert not [n.name for n in s.nodes if loader.pinned(n.name)], "pinned BPF maps left"


def _node_run(corral: Corral, name: str, node: str, *cmd: str) -> subprocess.CompletedProcess:
    return corral("node-exec", "--name", name, node, "--", *cmd, timeout=60)


def _nodes_in_etcd(url: str, tls: TLSFiles | None = None) -> dict[str, Node]:
    async def go() -> dict[str, Node]:
        async with Store(url, tls=tls) as store:
            objs, _ = await store.list(Node)
        return {o.name: o for o in objs}

    return asyncio.run(go())


def test_up_three_nodes_then_down(corral: Corral, cluster_name: str) -> None:
    cidr = unused_underlay_cidr()
    # The user's kubeconfig (here the test's own) already has a context of its own.
    kube = corral.root.parent / "kube" / "config"
    kube.parent.mkdir()
    theirs = {"name": "theirs", "context": {"cluster": "theirs", "user": "theirs"}}
    kube.write_text(json.dumps({"contexts": [theirs], "current-context": "theirs"}))
    corral.env["KUBECONFIG"] = str(kube)
    r = corral("up", "--name", cluster_name, "--nodes", "3", "--underlay-cidr", cidr, "--wait", "0")
    assert r.returncode == 0, r.stderr
    assert "✓ etcd https://127.0.0.1:" in r.stderr and "mutual TLS" in r.stderr
    assert "corral get nodes" in r.stdout
    s = corral.state(cluster_name)
    names = [n.name for n in s.nodes]
    assert names == [f"{cluster_name}-node-{i}" for i in (1, 2, 3)]
    assert f"✓ {names[0]} {s.nodes[0].ip}" in r.stderr
    for n in s.nodes:
        assert netns.exists(n.netns)
    assert s.host_ip == cidr.replace(".0/24", ".254")

    # Every node reaches every other node and the host over the underlay, and etcd,
    # which answers only a client with a certificate of the cluster's CA.
    port = s.etcd_node_urls[0].rsplit(":", 1)[1]
    tls = s.tls("node")
    assert tls is not None
    for n in s.nodes:
        for peer in [*(m.ip for m in s.nodes if m is not n), s.host_ip]:
            p = _node_run(corral, cluster_name, n.name, "ping", "-c1", "-W5", peer)
            assert p.returncode == 0, f"{n.name} -> {peer}: {p.stdout}{p.stderr}"
        h = _node_run(
            corral,
            cluster_name,
            n.name,
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            tls.ca,
            "--cert",
            tls.cert,
            "--key",
            tls.key,
            f"https://{s.host_ip}:{port}/health",
        )
        assert '"health":"true"' in h.stdout.replace(" ", ""), h.stdout + h.stderr
    for url in (f"http://{s.host_ip}:{port}/health", f"https://{s.host_ip}:{port}/health"):
        args = ["curl", "-sS", "--max-time", "10", "--cacert", tls.ca, url]
        h = _node_run(corral, cluster_name, "1", *args)
        assert h.returncode != 0 and "health" not in h.stdout, (url, h.stdout)

    # The state (processes, ports, certificates) is its owner's only.
    assert os.stat(s.state_dir).st_mode & 0o777 == 0o700
    assert os.stat(s.path).st_mode & 0o777 == 0o600

    # Nothing leaves the underlay, whatever the host's ip_forward: a node has no way
    # out (asked of the routing table only: no packet is sent), so neither other
    # clusters' nodes nor the world are reachable from a node or its pods.
    for n in s.nodes:
        r = _node_run(corral, cluster_name, n.name, "ip", "-4", "route", "show", "default")
        assert r.stdout.split()[:2] == ["unreachable", "default"], r.stdout
        for far in ("198.51.100.7", "10.251.250.1"):
            r = _node_run(corral, cluster_name, n.name, "ip", "route", "get", far)
            assert r.returncode != 0 and "no route to host" in r.stderr.lower(), (far, r.stderr)

    # node-exec lands in the node's own mounts: its eth0 and its CNI plugins.
    p = _node_run(corral, cluster_name, "2", "sh", "-c", "ip -o -4 addr show eth0; ls /opt/cni/bin")
    assert s.nodes[1].ip in p.stdout and "host-local" in p.stdout, p.stdout + p.stderr
    assert not os.path.exists(os.path.join("/run/corral", "marker-" + cluster_name))
    _node_run(corral, cluster_name, "1", "touch", f"/run/corral/marker-{cluster_name}")
    assert os.path.exists(os.path.join(s.node_dir(names[0]), "run", f"marker-{cluster_name}"))

    # The Node objects, found by the CLI without flags through the cluster's state.
    got = _nodes_in_etcd(s.etcd_urls[0], s.tls("cli"))
    assert set(names) <= set(got)
    assert got[names[0]].status.address("InternalIP") == s.nodes[0].ip
    assert got[names[0]].status.capacity["pods"] in ("110", 110)
    corral.env["CORRAL_CLUSTER"] = cluster_name
    g = corral("get", "nodes")
    assert g.returncode == 0 and names[2] in g.stdout, g.stderr

    # kubectl with no flags talks to the new cluster (as after `kind create cluster`).
    ctx = f"corral-{cluster_name}"
    cfg = yaml.safe_load(kube.read_text())
    assert cfg["current-context"] == ctx and os.stat(kube).st_mode & 0o777 == 0o600
    assert [c["name"] for c in cfg["contexts"]] == ["theirs", ctx]
    env = {"PATH": os.environ["PATH"], "HOME": str(kube.parent), "KUBECONFIG": str(kube)}
    for _ in range(60):  # the API server may still be starting (--wait 0)
        k = subprocess.run(
            ["kubectl", "get", "nodes"], env=env, capture_output=True, text=True, timeout=60
        )
        if k.returncode == 0:
            break
        time.sleep(0.5)
    assert k.returncode == 0 and names[2] in k.stdout, k.stderr
    # The API server keeps the `kubernetes` Service and puts itself into its endpoints.
    jp = "{.spec.clusterIP} {.spec.ports[0].port}"
    for _ in range(60):
        k = subprocess.run(
            ["kubectl", "get", "svc", "kubernetes", "-o", f"jsonpath={jp}"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if k.returncode == 0:
            break
        time.sleep(0.5)
    assert k.stdout == "10.96.0.1 443", k.stdout + k.stderr
    jp = "{.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}"
    k = subprocess.run(
        ["kubectl", "get", "endpoints", "kubernetes", "-o", f"jsonpath={jp}"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert k.stdout == f"{s.nodes[0].ip}:6443", k.stdout + k.stderr

    st = corral("status", "--name", cluster_name)
    assert f"etcd {s.etcd_urls[0]} ok" in st.stdout
    for n in s.nodes:
        row = next(line for line in st.stdout.splitlines() if line.startswith(n.name + " "))
        assert row.split()[1:4] == [n.ip, "ok", "ok"], st.stdout

    r = corral("down", "--name", cluster_name)
    assert r.returncode == 0 and "removed" in r.stdout, r.stderr
    _assert_gone(corral, s)
    cfg = yaml.safe_load(kube.read_text())  # exactly its own entries are gone again
    assert cfg["contexts"] == [theirs] and cfg["current-context"] == ""
    assert cfg["clusters"] == [] and cfg["users"] == []
    r = corral("down", "--name", cluster_name)
    assert r.returncode == 0 and "No cluster" in r.stdout
    st = corral("status", "--name", cluster_name)
    assert st.returncode == 1 and "no local cluster" in st.stderr


def test_up_twice_converges_and_recreates_what_is_missing(
    corral: Corral, cluster_name: str
) -> None:
    cidr = unused_underlay_cidr()
    s1 = _up(corral, cluster_name, "--nodes", "2", "--underlay-cidr", cidr)
    s2 = _up(corral, cluster_name)  # same cluster, no options: nothing changes
    assert s2.etcd_records == s1.etcd_records and s2.etcd_urls == s1.etcd_urls
    assert [n.holder for n in s2.nodes] == [n.holder for n in s1.nodes]
    assert [n.ip for n in s2.nodes] == [n.ip for n in s1.nodes]

    # A node's holder dies and a namespace vanishes: `up` brings both back.
    assert s2.nodes[0].holder is not None
    os.kill(s2.nodes[0].holder.pid, signal.SIGKILL)
    netns.remove(s2.nodes[1].netns)
    st = corral("status", "--name", cluster_name)
    assert st.returncode == 1
    s3 = _up(corral, cluster_name, "--nodes", "3")
    assert len(s3.nodes) == 3 and s3.etcd_records == s1.etcd_records
    assert s3.nodes[0].holder != s1.nodes[0].holder
    for n in s3.nodes:
        assert n.holder is not None and n.holder.alive()
        p = _node_run(corral, cluster_name, n.name, "ping", "-c1", "-W5", s3.host_ip)
        assert p.returncode == 0, p.stdout + p.stderr
    assert set(_nodes_in_etcd(s3.etcd_urls[0], s3.tls("cli"))) >= {n.name for n in s3.nodes}

    # Shrinking and changing the underlay are refused without touching anything.
    r = corral("up", "--name", cluster_name, "--nodes", "1")
    assert r.returncode == 1 and "only adds nodes" in r.stderr
    r = corral("up", "--name", cluster_name, "--underlay-cidr", unused_underlay_cidr())
    assert r.returncode == 1 and "corral down" in r.stderr
    assert corral.state(cluster_name).to_dict() == s3.to_dict()

    assert corral("down", "--name", cluster_name).returncode == 0
    _assert_gone(corral, s3)


def test_down_after_a_crash(corral: Corral, cluster_name: str) -> None:
    s = _up(corral, cluster_name, "--nodes", "2", "--underlay-cidr", unused_underlay_cidr())
    for rec in _all_procs(s):
        if rec.role == "holder" or rec.role == "etcd":
            os.kill(rec.pid, signal.SIGKILL)
    with open(s.path, "r+") as f:  # a state file cut off mid-write
        f.truncate(len(json.dumps(s.to_dict())) // 3)
    assert load(s.state_dir) is None
    assert corral("status", "--name", cluster_name).returncode == 1

    # `up` on the wreck converges: the old etcd data and namespaces are reused.
    s2 = _up(corral, cluster_name, "--nodes", "2", "--underlay-cidr", s.underlay_cidr)
    assert {n.name for n in s2.nodes} <= set(_nodes_in_etcd(s2.etcd_urls[0], s2.tls("cli")))
    p = _node_run(corral, cluster_name, "1", "ping", "-c1", "-W5", s2.nodes[1].ip)
    assert p.returncode == 0, p.stdout + p.stderr
    for rec in _all_procs(s2):
        if rec.role == "holder":
            os.kill(rec.pid, signal.SIGKILL)
    with open(s2.path, "w") as f:
        f.write("{")
    r = corral("down", "--name", cluster_name)
    assert r.returncode == 0, r.stderr
    _assert_gone(corral, s)
    _assert_gone(corral, s2)


def test_down_without_any_state_finds_namespaces_and_processes(
    corral: Corral, cluster_name: str
) -> None:
    s = _up(corral, cluster_name, "--nodes", "1", "--underlay-cidr", unused_underlay_cidr())
    os.unlink(s.path)
    r = corral("down", "--name", cluster_name)
    assert r.returncode == 0, r.stderr
    _assert_gone(corral, s)

    # A cluster made with --state-dir, removed without it: its etcd is still found.
    other = os.path.join(str(corral.root), "elsewhere")
    r = corral(
        "up",
        "--name",
        cluster_name,
        "--nodes",
        "1",
        "--wait",
        "0",
        "--state-dir",
        other,
        "--underlay-cidr",
        unused_underlay_cidr(),
    )
    assert r.returncode == 0, r.stderr
    s = corral.state("elsewhere")
    r = corral("down", "--name", cluster_name)
    assert r.returncode == 0, r.stderr
    assert s.etcd_records and not any(r.alive() for r in s.etcd_records)
    assert not netns.list_names(f"{cluster_name}-")
    assert corral("down", "--name", cluster_name, "--state-dir", other).returncode == 0
    _assert_gone(corral, s)


def test_external_etcd_is_relayed_into_the_nodes(corral: Corral, cluster_name: str, etcd) -> None:  # type: ignore[no-untyped-def]
    s = _up(
        corral,
        cluster_name,
        "--nodes",
        "2",
        "--etcd",
        etcd.url,
        "--underlay-cidr",
        unused_underlay_cidr(),
    )
    assert s.etcd_external and s.etcd_members == [] and s.etcd_urls == [etcd.url]
    assert not os.path.exists(s.etcd_dir)
    for n in s.nodes:  # the host's loopback URL works unchanged inside every node
        h = _node_run(
            corral, cluster_name, n.name, "curl", "-sS", "--max-time", "10", f"{etcd.url}/health"
        )
        assert '"health":"true"' in h.stdout.replace(" ", ""), h.stdout + h.stderr
    assert {n.name for n in s.nodes} <= set(_nodes_in_etcd(etcd.url))
    assert "relay into the nodes ok" in corral("status", "--name", cluster_name).stdout
    assert corral("down", "--name", cluster_name).returncode == 0
    _assert_gone(corral, s)
    assert not {n.name for n in s.nodes} & set(_nodes_in_etcd(etcd.url))
    assert etcd.record is not None and etcd.record.alive()  # not ours to stop

    # The relay is found and stopped even when the state file is lost.
    s = _up(
        corral,
        cluster_name,
        "--nodes",
        "1",
        "--etcd",
        etcd.url,
        "--underlay-cidr",
        unused_underlay_cidr(),
    )
    assert s.relay is not None and s.relay.alive()
    os.unlink(s.path)
    assert corral("down", "--name", cluster_name).returncode == 0
    _assert_gone(corral, s)
    asyncio.run(_delete_node(etcd.url, s.nodes[0].name))


async def _delete_node(url: str, name: str) -> None:
    async with Store(url) as store:
        await store.delete(Node, name)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "1 to 50 nodes"),
        (["--nodes", "51"], "1 to 50 nodes"),
        (["--underlay-cidr", "10.250.0.0/33"], "not a CIDR"),
        (["--underlay-cidr", "banana"], "not a CIDR"),
        (["--underlay-cidr", "10.250.0.1/24"], "host bits set"),
        (["--underlay-cidr", "10.244.8.0/24"], "cluster (pod) CIDR"),
        (["--underlay-cidr", "10.100.0.0/16"], "service CIDR"),
        (["--underlay-cidr", "HOST"], "overlaps the host's network"),
        (["--underlay-cidr", "10.250.0.0/30"], "too small"),
        (["--etcd", "ftp://x"], "--etcd"),
        (["--name", "a-name-much-too-long"], "at most 12"),
        (["--name", "Bad_Name"], "not valid"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_made(
    corral: Corral, cluster_name: str, args: list[str], message: str
) -> None:
    host_net = next(str(n) for i, n in underlay.host_networks() if not n.is_loopback)
    args = [host_net if a == "HOST" else a for a in args]
    if "--name" not in args:
        args = ["--name", cluster_name, *args]
    name = args[args.index("--name") + 1]
    r = corral("up", "--wait", "0", *args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not netns.list_names(name)  # other engineers' namespaces may come and go
    assert not [i for i in os.listdir("/sys/class/net") if i.startswith(name[:12])]
    assert not corral.root.exists() or not any(corral.root.iterdir())


def test_node_exec_errors_name_the_fix(corral: Corral, cluster_name: str) -> None:
    r = corral("node-exec", "--name", cluster_name, "node-1", "--", "true")
    assert r.returncode == 1 and "corral up" in r.stderr and "Traceback" not in r.stderr


def test_non_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.cluster import local, plan, up

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(local.ClusterError, match="needs root"):
        up.up(plan.UpOptions(name="x"))


def test_down_stops_the_pods_of_its_nodes(corral: Corral, cluster_name: str) -> None:
    """Pods have their own network and mount namespaces; down still finds and stops them."""
    from corral.api.objects import Container, ObjectMeta, Pod, PodSpec
    from corral.cluster import nodes

    s = _up(corral, cluster_name, "--nodes", "1", "--underlay-cidr", unused_underlay_cidr())
    node = s.nodes[0].name
    if not any(r.role == "daemon:node" for r in s.daemons):
        pytest.skip("no node agent to run pods yet")

    async def create() -> None:
        async with Store(s.etcd_urls, tls=s.tls("cli")) as store:
            await store.create(
                Pod(
                    metadata=ObjectMeta(name="sleeper"),
                    spec=PodSpec(
                        node_name=node, containers=[Container(name="c", command=["sleep", "600"])]
                    ),
                )
            )

    asyncio.run(create())
    deadline = time.monotonic() + 90
    while not nodes.pod_cgroup_uids(node):
        assert time.monotonic() < deadline, (
            "the pod never started:\n" + Path(s.logs_dir, f"node-{node}.log").read_text()[-3000:]
        )
        time.sleep(0.2)
    uid = next(iter(nodes.pod_cgroup_uids(node)))
    procs = f"/sys/fs/cgroup/pids/corral/{node}/{uid}"
    deadline = time.monotonic() + 60
    while not _cgroup_pids(procs):
        assert time.monotonic() < deadline, "the pod's process never started"
        time.sleep(0.2)
    pids = _cgroup_pids(procs)

    assert corral("down", "--name", cluster_name).returncode == 0
    _assert_gone(corral, s)
    assert not nodes.pod_cgroup_uids(node)
    assert not os.path.exists(procs)
    # Gone, or a zombie whose parent never reaps it (start_time is None for both).
    assert not [pid for pid in pids if start_time(pid) is not None], "pod processes left"


def _cgroup_pids(d: str) -> set[int]:
    out: set[int] = set()
    for root, _, files in os.walk(d):
        if "cgroup.procs" in files:
            with open(os.path.join(root, "cgroup.procs")) as f:
                out.update(int(x) for x in f.read().split())
    return out
