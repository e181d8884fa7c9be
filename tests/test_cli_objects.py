"""`corral apply/get/delete` as a user runs them: real processes, real etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

APP = textwrap.dedent("""
    apiVersion: v1
    kind: Service
    metadata: {name: web, labels: {app: web}}
    spec:
      selector: {app: web}
      sessionAffinity: ClientIP
      ports: [{name: http, port: 80, targetPort: http}]
    ---
    apiVersion: v1
    kind: ReplicationController
    metadata: {name: web}
    spec:
      replicas: 3
      template:
        metadata: {labels: {app: web}}
        spec:
          containers:
          - name: web
            command: [python3, -m, http.server, "8080"]
            ports: [{name: http, containerPort: 8080}]
    """)


@pytest.fixture
def corral(etcd, store, tmp_path: Path):
    """Run the real `corral` command against the test etcd; returns CompletedProcess."""
    env = dict(os.environ, CORRAL_ETCD=etcd.url, CORRAL_STATE_DIR=str(tmp_path / "state"))

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def test_apply_get_delete_roundtrip(corral, tmp_path: Path) -> None:
    f = tmp_path / "app.yaml"
    f.write_text(APP)
    r = corral("apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["service/web created", "replicationcontroller/web created"]

    r = corral("apply", "-f", str(f))
    assert r.stdout.splitlines() == ["service/web unchanged", "replicationcontroller/web unchanged"]

    r = corral("get", "services")
    assert r.returncode == 0
    header, row = r.stdout.splitlines()
    assert header.split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert row.split()[:2] == ["web", "ClusterIP"]

    r = corral("get", "svc", "web", "-o", "json")
    svc = json.loads(r.stdout)
    assert svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] == 10800

    r = corral("get", "rc", "-o", "yaml")  # a list query is a List, even of one
    listed = yaml.safe_load(r.stdout)
    assert listed["kind"] == "List" and len(listed["items"]) == 1
    rc = listed["items"][0]
    assert rc["spec"]["replicas"] == 3 and rc["spec"]["selector"] == {"app": "web"}

    f.write_text(APP.replace("replicas: 3", "replicas: 5"))
    r = corral("apply", "-f", str(f))
    assert "replicationcontroller/web configured" in r.stdout

    r = corral("delete", "service", "web")
    assert r.returncode == 0 and "service/web deleted" in r.stdout
    r = corral("get", "svc", "web")
    assert r.returncode == 1 and "not found" in r.stderr
    r = corral("delete", "svc", "web")
    assert r.returncode == 1 and "not found" in r.stderr
    r = corral("delete", "svc", "web", "--ignore-not-found")
    assert r.returncode == 0


def test_apply_from_stdin_and_namespace_flag(corral) -> None:
    r = corral("apply", "-n", "shop", "-f", "-", stdin=APP)  # no namespace shop yet
    assert r.returncode == 1 and "namespace 'shop' not found" in r.stderr, r.stderr
    assert corral("get", "svc", "-n", "shop").stderr.startswith("No resources found")
    assert corral("create", "namespace", "shop").stdout == "namespace/shop created\n"
    r = corral("apply", "-n", "shop", "-f", "-", stdin=APP)
    assert r.returncode == 0, r.stderr
    assert corral("get", "svc").stderr.startswith("No resources found")
    r = corral("get", "svc", "-n", "shop", "-o", "name")
    assert r.stdout.strip() == "services/web"
    r = corral("get", "rc", "-A")
    assert r.stdout.splitlines()[1].split()[:2] == ["shop", "web"]


def test_bad_manifest_applies_nothing(corral, tmp_path: Path) -> None:
    f = tmp_path / "mixed.yaml"
    # The first document is fine; the second is not: neither may be stored.
    f.write_text(
        APP
        + textwrap.dedent("""
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: broken}
        spec:
          containers: [{name: c, resources: {limits: {memory: plenty}}}]
        """)
    )
    r = corral("apply", "-f", str(f))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "spec.containers[0].resources.limits.memory" in r.stderr
    assert corral("get", "svc").stderr.startswith("No resources found")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["get", "widgets"], "unknown resource type 'widgets'"),
        (["get", "pods", "-o", "xml"], "invalid choice: 'xml'"),
        (["apply", "-f", "/nonexistent/app.yaml"], "cannot read /nonexistent/app.yaml"),
        (["delete", "pod"], "delete needs KIND and at least one NAME"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_mistakes_get_a_clear_error(corral, args: list[str], words: str) -> None:
    r = corral(*args)
    assert r.returncode != 0
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_etcd_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(
        os.environ, CORRAL_ETCD="http://127.0.0.1:1", CORRAL_STATE_DIR=str(tmp_path / "state")
    )
    r = subprocess.run(
        [sys.executable, "-m", "corral", "get", "pods"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "cannot reach etcd at http://127.0.0.1:1" in r.stderr
    assert "corral up" in r.stderr and "Traceback" not in r.stderr


def test_network_config_apply_is_checked_against_the_cluster(corral, tmp_path: Path) -> None:
    """A config whose range holds a node's own address is refused; nothing is written."""
    node = tmp_path / "node.yaml"
    node.write_text(
        textwrap.dedent("""
        apiVersion: v1
        kind: Node
        metadata: {name: n1}
        status: {addresses: [{type: InternalIP, address: 10.60.0.5}]}
        """)
    )
    assert corral("apply", "-f", str(node)).returncode == 0
    net = tmp_path / "net.yaml"
    net.write_text(
        textwrap.dedent("""
        apiVersion: corral.dev/v1
        kind: NetworkConfig
        metadata: {name: cluster}
        spec: {network: 10.60.0.0/16}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: alongside}
        spec: {ports: [{port: 80}]}
        """)
    )
    r = corral("apply", "-f", str(net))
    assert r.returncode == 1, r.stdout
    assert "10.60.0.5" in r.stderr and "nothing was applied" in r.stderr
    assert corral("get", "svc").stderr.startswith("No resources found")


async def test_reapply_keeps_the_allocated_cluster_ip(corral, tmp_path: Path, store) -> None:
    """The VIP and node port the cluster assigned survive `apply` of a manifest naming none."""
    from corral.api.objects import Service

    f = tmp_path / "svc.yaml"
    f.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {type: NodePort, selector: {app: web}, ports: [{port: 80}]}\n"
    )
    assert corral("apply", "-f", str(f)).returncode == 0

    def give(s: Service) -> Service:  # what the service IP allocator does
        s.spec.cluster_ip = "10.96.7.7"
        s.spec.cluster_ips = ["10.96.7.7"]
        s.spec.ports[0].node_port = 30007
        return s

    await store.modify(Service, "web", "default", give)
    f.write_text(f.read_text().replace("{app: web}", "{app: web2}"))
    r = corral("apply", "-f", str(f))
    assert "service/web configured" in r.stdout, r.stderr
    svc = json.loads(corral("get", "svc", "web", "-o", "json").stdout)
    assert svc["spec"]["selector"] == {"app": "web2"}
    assert svc["spec"]["clusterIP"] == "10.96.7.7"
    assert svc["spec"]["ports"][0]["nodePort"] == 30007


def test_get_label_selector_forms(corral, tmp_path: Path) -> None:
    """`-l` takes kubectl's forms: k=v, k!=v (absent keys match) and a bare key (exists)."""
    f = tmp_path / "nodes.yaml"
    f.write_text(
        textwrap.dedent("""
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Node, metadata: {name: a, labels: {disk: ssd, zone: x}}}
        - {apiVersion: v1, kind: Node, metadata: {name: b, labels: {disk: hdd}}}
        - {apiVersion: v1, kind: Node, metadata: {name: c}}
        """)
    )
    assert corral("apply", "-f", str(f)).returncode == 0

    def names(sel: str) -> list[str]:
        r = corral("get", "nodes", "-l", sel, "-o", "name")
        return r.stdout.split()

    assert names("disk=ssd") == ["nodes/a"]
    assert names("disk!=ssd") == ["nodes/b", "nodes/c"]
    assert names("zone") == ["nodes/a"]
    assert names("disk,disk!=hdd") == ["nodes/a"]


def _services(names: list[str], port: int = 80) -> str:
    return "\n---\n".join(
        textwrap.dedent(f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: {n}}}
        spec: {{selector: {{app: {n}}}, ports: [{{port: {port}}}]}}
        """)
        for n in names
    )


def test_apply_in_batches_keeps_verbs_order_and_all_or_nothing(corral, tmp_path: Path) -> None:
    """300 Services: more than one transaction's worth (128) and read by a list, not by
    key. The verbs follow the documents; one bad document among them applies nothing."""
    names = [f"s{i}" for i in range(300)]
    f = tmp_path / "many.yaml"
    f.write_text(_services(names))
    r = corral("apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"service/{n} created" for n in names]

    # Change every tenth: configured; the rest unchanged (and not rewritten).
    changed = set(names[::10])
    f.write_text("\n---\n".join(_services([n], 81 if n in changed else 80) for n in names))
    r = corral("apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    want = [f"service/{n} {'configured' if n in changed else 'unchanged'}" for n in names]
    assert r.stdout.splitlines() == want
    listed = json.loads(corral("get", "svc", "-o", "json").stdout)["items"]
    ports = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in listed}
    assert ports == {n: 81 if n in changed else 80 for n in names}
    gens = {s["metadata"]["name"]: s["metadata"]["generation"] for s in listed}
    assert gens == {n: 2 if n in changed else 1 for n in names}

    # 299 new good documents and one bad one (the 200th): nothing is written.
    more = [f"t{i}" for i in range(300)]
    docs = _services(more).split("\n---\n")
    docs[199] = docs[199].replace("port: 80", "port: 0")
    f.write_text("\n---\n".join(docs))
    r = corral("apply", "-f", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "document 200" in r.stderr and "spec.ports[0].port" in r.stderr, r.stderr
    r = corral("get", "svc", "-o", "name")
    assert sorted(r.stdout.split()) == sorted(f"services/{n}" for n in names)


async def test_a_batch_written_meanwhile_is_applied_object_by_object(store) -> None:
    """A batch whose CAS fails (another writer got in between the read and the write)
    loses nothing: each object is re-read and applied alone, the other write is seen."""
    from corral.api.manifest import load_manifests
    from corral.api.objects import Service
    from corral.cli import apply_objects as ap

    names = [f"c{i}" for i in range(40)]
    for o in load_manifests(_services(names)):
        await store.create(o)
    objs = load_manifests(_services(names, 81))
    existing = await ap.read_existing(store, objs)
    assert len(existing) == 40

    # Another writer relabels c7 after our read: our batch's CAS on c7 must fail.
    def relabel(s: Service) -> Service:
        s.metadata.labels = {"touched": "yes"}
        return s

    await store.modify(Service, "c7", "default", relabel)
    real_read = ap.read_existing

    async def stale_read(store_, objs_):  # the read happened before the other write
        return existing

    ap.read_existing = stale_read  # type: ignore[assignment]
    try:
        planned = await ap.apply_objects(store, objs)
    finally:
        ap.read_existing = real_read  # type: ignore[assignment]
    assert [p.verb for p in planned] == ["configured"] * 40
    svcs, _ = await store.list(Service)
    assert {s.name: s.spec.ports[0].port for s in svcs} == {n: 81 for n in names}
    # apply replaces the object with the manifest (as `put` always did): the labels
    # the other writer set are gone, but only after its write was read, not blindly.
    c7 = next(s for s in svcs if s.name == "c7")
    assert c7.metadata.generation == 2 and c7.metadata.labels == {}


def test_reapplying_a_bound_pods_manifest_keeps_it_where_it_runs() -> None:
    """The scheduler's nodeName and the runtime's annotations stay (kubectl apply's
    merge keeps them too); what the manifest says still wins where it says it."""
    from corral.api.objects import Pod
    from corral.api.store import KV
    from corral.cli.apply_objects import plan

    manifest = {
        "metadata": {"name": "web", "namespace": "default", "labels": {"v": "1"}},
        "spec": {"containers": [{"name": "c", "command": ["sleep", "9"]}]},
    }
    live = Pod.model_validate(manifest)
    live.spec.node_name = "node-2"
    live.metadata.annotations["corral.dev/runtime"] = '{"node": "node-2"}'
    kv = KV("/corral/v1/pods/default/web", live.model_dump_json(by_alias=True).encode(), 7, 3)
    again = Pod.model_validate(manifest)
    (p,) = plan([again], {kv.key: kv})
    assert p.obj.spec.node_name == "node-2"
    assert p.obj.metadata.annotations["corral.dev/runtime"] == '{"node": "node-2"}'
    assert p.verb == "unchanged"
