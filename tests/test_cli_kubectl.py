"""kubectl's everyday verbs in `corral`, run as a user runs them (real processes, real
etcd): namespaces, label/annotate, patch, edit, get -w, explain, completion. Every
mistake names the field and changes nothing."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from corral.api.objects import ContainerStatus, Namespace, Pod, ReplicationController
from tests.etcd_helpers import on_store

RC = textwrap.dedent("""
    apiVersion: v1
    kind: ReplicationController
    metadata: {name: web, labels: {app: web}}
    spec:
      replicas: 2
      template:
        metadata: {labels: {app: web}}
        spec:
          containers:
          - name: web
            command: [sleep, "3600"]
            env: [{name: A, value: "1"}, {name: B, value: "2"}]
            ports: [{containerPort: 8080}]
          - name: side
            command: [sleep, "3600"]
    """)

POD = textwrap.dedent("""
    apiVersion: v1
    kind: Pod
    metadata: {name: box, labels: {app: box}}
    spec:
      containers: [{name: main, command: [sleep, "3600"]}]
    """)


@pytest.fixture
def env(etcd_url: str, tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, CORRAL_ETCD=etcd_url, CORRAL_STATE_DIR=str(tmp_path / "state"))


@pytest.fixture
def corral(env: dict[str, str]):
    def run(*args: str, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env={**env, **extra},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def stored(url: str, kind, name: str, ns: str | None = "default"):  # type: ignore[no-untyped-def]
    return on_store(url, lambda s: s.get(kind, name, ns))


# ------------------------------------------------------------ namespaces


def test_namespaces_are_objects(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    r = corral("apply", "-n", "shop", "-f", "-", stdin=POD)
    assert r.returncode == 1
    assert "metadata.namespace: namespace 'shop' not found" in r.stderr
    assert "corral create namespace shop" in r.stderr and "nothing was applied" in r.stderr
    assert stored(etcd_url, Pod, "box", "shop") is None

    r = corral("create", "namespace", "shop")
    assert r.returncode == 0 and r.stdout == "namespace/shop created\n", r.stderr
    r = corral("create", "ns", "shop")
    assert r.returncode == 1 and "namespaces 'shop' already exists" in r.stderr
    r = corral("create", "namespace", "Shop_1")
    assert r.returncode == 1 and "metadata.name" in r.stderr and "DNS label" in r.stderr
    assert corral("apply", "-n", "shop", "-f", "-", stdin=POD).returncode == 0
    assert corral("apply", "-f", "-", stdin=POD).returncode == 0  # into `default`

    r = corral("get", "ns")
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0] == ["NAME", "STATUS", "AGE"]
    got = {row[0]: row[1] for row in rows[1:]}
    assert got["shop"] == "Active" and got["default"] == "Active"  # default: made on first use

    r = corral("delete", "namespace", "default")
    assert r.returncode == 1 and "'default' is built in and may not be deleted" in r.stderr

    # No controllers run here: the namespace stays Terminating, and refuses new objects.
    r = corral("delete", "ns", "shop")
    assert r.returncode == 0 and r.stdout == "namespace/shop deleted\n", r.stderr
    assert ["shop", "Terminating"] in [
        ln.split()[:2] for ln in corral("get", "namespaces").stdout.splitlines()
    ]
    r = corral("describe", "ns", "shop")
    assert "Terminating (since" in r.stdout and "  pods: 1" in r.stdout, r.stdout
    r = corral("run", "more", "-n", "shop", "--", "sleep", "1")
    assert r.returncode == 1 and "namespace 'shop' is being terminated" in r.stderr
    r = corral("delete", "ns", "shop", "--wait", "--timeout", "1")
    assert r.returncode == 1 and "still there after 1s: namespace/shop" in r.stderr
    assert "is `corral controllers` running?" in r.stderr
    # --force does the namespace controller's work at once (pods without waiting)
    r = corral("delete", "ns", "shop", "--force")
    assert r.returncode == 0, r.stderr
    assert stored(etcd_url, Namespace, "shop", None) is None
    assert stored(etcd_url, Pod, "box", "shop") is None


# ------------------------------------------------------------ label / annotate


def test_label_and_annotate(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    assert corral("apply", "-f", "-", stdin=POD).returncode == 0
    assert corral("apply", "-f", "-", stdin=POD.replace("box", "crate")).returncode == 0

    r = corral("label", "pods", "box", "tier=front", "team=a")
    assert r.returncode == 0 and r.stdout == "pod/box labeled\n", r.stderr
    rv = stored(etcd_url, Pod, "box").metadata.resource_version
    r = corral("label", "pod", "box", "tier=back")
    assert r.returncode == 1 and "'tier' already has a value (front)" in r.stderr
    assert "--overwrite" in r.stderr
    assert stored(etcd_url, Pod, "box").metadata.resource_version == rv  # nothing written
    r = corral("label", "pod/box", "tier=back", "--overwrite")
    assert r.returncode == 0, r.stderr
    r = corral("label", "pod", "box", "team-")
    assert r.stdout == "pod/box unlabeled\n"
    assert stored(etcd_url, Pod, "box").metadata.labels == {"app": "box", "tier": "back"}
    assert corral("label", "pod", "box", "--list").stdout == "app=box\ntier=back\n"

    r = corral("label", "pod", "box", "tier=not valid!", "--overwrite")
    assert r.returncode == 1 and "metadata.labels" in r.stderr and "not valid" in r.stderr
    assert stored(etcd_url, Pod, "box").metadata.labels["tier"] == "back"

    r = corral("label", "pods", "--all", "zone=z1")
    assert sorted(r.stdout.splitlines()) == ["pod/box labeled", "pod/crate labeled"]
    r = corral("label", "pods", "-l", "app=crate", "zone-")
    assert r.stdout == "pod/crate unlabeled\n"
    assert "zone" in stored(etcd_url, Pod, "box").metadata.labels
    r = corral("label", "pods", "nope", "a=b")
    assert r.returncode == 1 and "pods 'nope' not found" in r.stderr

    r = corral("annotate", "pod", "box", "note=hello world")
    assert r.returncode == 0 and r.stdout == "pod/box annotated\n", r.stderr
    r = corral("annotate", "pod", "box", "note=bye")
    assert r.returncode == 1 and "annotation 'note' already has a value" in r.stderr
    assert stored(etcd_url, Pod, "box").metadata.annotations["note"] == "hello world"


# ------------------------------------------------------------ patch


def test_patch_strategic_merge_json_and_errors(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    assert corral("apply", "-f", "-", stdin=RC).returncode == 0
    before = stored(etcd_url, ReplicationController, "web")

    # strategic: containers merge by name, env by name, ports by containerPort
    patch = {
        "spec": {
            "replicas": 3,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "env": [{"name": "B", "value": "20"}, {"name": "C", "value": "3"}],
                            "ports": [{"containerPort": 9090}],
                        }
                    ]
                }
            },
        }
    }
    r = corral("patch", "rc", "web", "-p", json.dumps(patch))
    assert r.returncode == 0 and r.stdout == "replicationcontroller/web patched\n", r.stderr
    rc = stored(etcd_url, ReplicationController, "web")
    assert rc.spec.replicas == 3
    web, side = rc.spec.template.spec.containers
    assert (web.name, side.name) == ("web", "side")  # the other container is kept
    assert [(e.name, e.value) for e in web.env] == [("A", "1"), ("B", "20"), ("C", "3")]
    assert [p.container_port for p in web.ports] == [8080, 9090]
    assert rc.metadata.generation == before.metadata.generation + 1

    # $patch: delete removes one item by its key
    r = corral(
        "patch",
        "rc",
        "web",
        "-p",
        '{"spec":{"template":{"spec":{"containers":[{"name":"side","$patch":"delete"}]}}}}',
    )
    assert r.returncode == 0, r.stderr
    assert [
        c.name for c in stored(etcd_url, ReplicationController, "web").spec.template.spec.containers
    ] == ["web"]

    # merge (RFC 7386): a list is replaced whole
    r = corral(
        "patch",
        "rc",
        "web",
        "--type",
        "merge",
        "-p",
        '{"metadata":{"labels":{"app":null,"v":"2"}},"spec":{"template":{"spec":'
        '{"containers":[{"name":"only","command":["true"]}]}}}}',
    )
    assert r.returncode == 0, r.stderr
    rc = stored(etcd_url, ReplicationController, "web")
    assert [c.name for c in rc.spec.template.spec.containers] == ["only"]
    assert rc.metadata.labels == {"v": "2"}

    # json (RFC 6902)
    ops = [
        {"op": "replace", "path": "/spec/replicas", "value": 1},
        {"op": "add", "path": "/metadata/annotations", "value": {"k": "v"}},
    ]
    r = corral("patch", "rc/web", "--type", "json", "-p", json.dumps(ops))
    assert r.returncode == 0, r.stderr
    assert corral("patch", "rc/web", "--type", "json", "-p", json.dumps(ops)).stdout.endswith(
        "patched (no change)\n"
    )

    rv = stored(etcd_url, ReplicationController, "web").metadata.resource_version
    # errors: each names the field, nothing is written
    r = corral("patch", "rc", "web", "-p", '{"spec":{"replicaz":4}}')
    assert r.returncode == 1 and "spec.replicaz: unknown field" in r.stderr, r.stderr
    r = corral("patch", "rc", "web", "-p", '{"spec":{"replicas":"four"}}')
    assert r.returncode == 1 and "spec.replicas" in r.stderr
    r = corral(
        "patch", "rc", "web", "--type", "json", "-p", '[{"op":"remove","path":"/spec/nothing"}]'
    )
    assert r.returncode == 1 and "/spec/nothing" in r.stderr
    r = corral("patch", "rc", "web", "-p", '{"metadata":{"name":"other"}}')
    assert r.returncode == 1 and "metadata.name: may not be changed" in r.stderr
    assert stored(etcd_url, ReplicationController, "web").metadata.resource_version == rv

    assert corral("apply", "-f", "-", stdin=POD).returncode == 0
    r = corral("patch", "pod", "box", "-p", '{"spec":{"restartPolicy":"Never"}}')
    assert r.returncode == 1 and "spec: a pod's spec may not change" in r.stderr
    r = corral(
        "patch",
        "pod",
        "box",
        "-p",
        '{"spec":{"containers":[{"name":"main","image":"/srv/rootfs"}]}}',
    )
    assert r.returncode == 0, r.stderr  # the image may change, as in Kubernetes


# ------------------------------------------------------------ edit


def editor(tmp_path: Path, body: str) -> str:
    """An $EDITOR that runs `body` (Python, with `text` the file's content) on the file."""
    script = tmp_path / "editor.py"
    script.write_text(
        "import sys, subprocess, os\n"
        "path = sys.argv[1]\n"
        "text = open(path).read()\n" + textwrap.dedent(body) + "open(path, 'w').write(text)\n"
    )
    return f"{sys.executable} {script}"


def test_edit_saves_valid_changes_and_keeps_bad_ones_out(corral, etcd_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert corral("apply", "-f", "-", stdin=RC).returncode == 0
    ed = editor(tmp_path, "text = text.replace('replicas: 2', 'replicas: 4')\n")
    r = corral("edit", "rc", "web", EDITOR=ed)
    assert r.returncode == 0 and r.stdout == "replicationcontroller/web edited\n", r.stderr
    assert stored(etcd_url, ReplicationController, "web").spec.replicas == 4

    r = corral("edit", "rc", "web", EDITOR=editor(tmp_path, "pass\n"))
    assert r.returncode == 0 and "no changes made" in r.stdout

    # An invalid edit comes back with the error; saved unchanged again, it is given up,
    # the file kept and nothing written. KUBE_EDITOR wins over EDITOR.
    rv = stored(etcd_url, ReplicationController, "web").metadata.resource_version
    bad = editor(
        tmp_path,
        """
        open(path + '.seen', 'a').write(text + '\\n=====\\n')
        text = text.replace('replicas: 4', 'replicaz: 5')
        """,
    )
    r = corral("edit", "rc", "web", KUBE_EDITOR=bad, EDITOR="false")
    assert r.returncode == 1
    assert "spec.replicaz: unknown field" in r.stderr, r.stderr
    kept = r.stderr.split("A copy of your changes is in ")[1].split(";")[0]
    assert "replicaz: 5" in Path(kept).read_text()
    rounds = Path(kept + ".seen").read_text().split("=====")
    assert "# The edit could not be saved:" in rounds[1] and "spec.replicaz" in rounds[1]
    assert stored(etcd_url, ReplicationController, "web").metadata.resource_version == rv

    # Someone else writes while the editor is open: compare-and-swap, nothing saved.
    racing = editor(
        tmp_path,
        """
        subprocess.run([sys.executable, '-m', 'corral', 'label', 'rc', 'web', 'x=y'], check=True)
        text = text.replace('replicas: 4', 'replicas: 6')
        """,
    )
    r = corral("edit", "rc", "web", EDITOR=racing)
    assert r.returncode == 1 and "changed in etcd while you were editing" in r.stderr, r.stderr
    rc = stored(etcd_url, ReplicationController, "web")
    assert rc.spec.replicas == 4 and rc.metadata.labels["x"] == "y"


def test_edit_several_objects_as_a_list(corral, etcd_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in ("a", "b"):
        assert corral("apply", "-f", "-", stdin=POD.replace("box", name)).returncode == 0
    ed = editor(
        tmp_path,
        """
        import yaml
        doc = yaml.safe_load(text)
        assert doc['kind'] == 'List', doc
        for item in doc['items']:
            item['metadata']['labels']['edited'] = item['metadata']['name']
        text = yaml.safe_dump(doc)
        """,
    )
    r = corral("edit", "pods", "a", "b", EDITOR=ed)
    assert r.returncode == 0 and r.stdout == "pod/a edited\npod/b edited\n", r.stderr
    assert stored(etcd_url, Pod, "b").metadata.labels["edited"] == "b"

    renamed = editor(tmp_path, "text = text.replace('name: a', 'name: c')\n")
    r = corral("edit", "pods", "a", "b", EDITOR=renamed)
    assert r.returncode == 1 and "metadata.name: may not be changed (is 'a')" in r.stderr
    assert stored(etcd_url, Pod, "c") is None


# ------------------------------------------------------------ get -w


class Lines:
    """A process's stdout, line by line, read by a thread (so a wait can time out)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            self.q.put(line.rstrip("\n"))

    def until(self, pred, timeout: float = 30.0) -> str:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if pred(line):
                return line
        raise AssertionError(f"no such line within {timeout}s; saw {self.seen!r}")


@pytest.fixture
def watcher(env):  # type: ignore[no-untyped-def]
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> Lines:
        p = subprocess.Popen(
            [sys.executable, "-m", "corral", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(p)
        return Lines(p)

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def test_get_watch_prints_the_table_then_each_change(corral, watcher) -> None:  # type: ignore[no-untyped-def]
    assert corral("apply", "-f", "-", stdin=POD.replace("box", "first")).returncode == 0
    out = watcher("get", "pods", "-w")
    header = out.until(lambda line: line.startswith("NAME"))
    assert header.split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    first = out.until(lambda line: "first" in line)
    assert first.split()[:3] == ["first", "0/1", "Pending"]
    assert first.index("0/1") == header.index("READY")  # the columns line up

    assert corral("apply", "-f", "-", stdin=POD.replace("box", "second")).returncode == 0
    row = out.until(lambda line: line.startswith("second"))
    assert row.split()[:4] == ["second", "0/1", "Pending", "0"]

    events = watcher("get", "pods", "-w", "--watch-only", "--output-watch-events", "-o", "name")
    time.sleep(1.0)  # --watch-only prints nothing to wait for: let it start watching
    assert corral("label", "pod", "second", "seen=yes").returncode == 0
    assert events.until(lambda line: "second" in line) == "MODIFIED pods/second"
    assert corral("delete", "pod", "second").returncode == 0  # unscheduled: gone at once
    assert events.until(lambda line: "second" in line) == "DELETED pods/second"
    assert "first" not in " ".join(events.seen)
    out.until(lambda line: line.startswith("second") and "seen" not in line)  # modified row


# ------------------------------------------------------------ explain, completion, --help


def test_explain_walks_the_object_model(corral) -> None:  # type: ignore[no-untyped-def]
    r = corral("explain", "pods")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("KIND:     Pod\nVERSION:  v1\n")
    assert "  spec        <PodSpec> -required-" in r.stdout

    r = corral("explain", "pod.spec.containers.ports")
    assert "FIELD:    ports <[]ContainerPort>" in r.stdout
    assert "containerPort  <integer> -required-" in r.stdout
    assert "protocol       <string> (TCP, UDP, SCTP)" in r.stdout

    r = corral("explain", "pod.spec.restartPolicy")
    assert "FIELD:    restartPolicy <string> (Always, OnFailure, Never)" in r.stdout
    assert "When the node restarts a container" in r.stdout

    r = corral("explain", "ns.status", "--recursive")
    assert "conditions" in r.stdout and "lastTransitionTime" in r.stdout

    r = corral("explain", "svc.spec.typo")
    assert r.returncode == 1
    assert "field 'typo' does not exist in Service.spec" in r.stderr and "clusterIP" in r.stderr
    r = corral("explain", "pod.spec.restartPolicy.x")
    assert r.returncode == 1 and "pod" not in r.stdout
    assert "Pod.spec.restartPolicy is a string: it has no fields" in r.stderr
    r = corral("explain", "widgets")
    assert r.returncode == 1 and "unknown resource type 'widgets'" in r.stderr


def complete(env: dict[str, str], script: str, line: str) -> list[str]:
    """What bash completes for `line` (the last word is the one being completed)."""
    words = line.split(" ")
    prog = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        '_corral; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    path = f"{Path(sys.executable).parent}:{env['PATH']}"  # `corral` itself, for names
    r = subprocess.run(
        ["bash", "-c", prog], env={**env, "PATH": path}, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.split("\n") if w]


def test_bash_completion(corral, env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = corral("completion", "bash")
    assert r.returncode == 0 and "complete -F _corral corral" in r.stdout
    script = tmp_path / "corral.bash"
    script.write_text(r.stdout)
    assert complete(env, str(script), "corral ge") == ["get"]
    assert "label" in complete(env, str(script), "corral ")
    assert complete(env, str(script), "corral get po") == ["po", "pod", "pods"]
    assert complete(env, str(script), "corral get pods -o ") == ["wide", "json", "yaml", "name"]
    assert complete(env, str(script), "corral get pods --watch-o") == ["--watch-only"]
    assert complete(env, str(script), "corral network s") == ["set", "show"]
    assert complete(env, str(script), "corral network show -o y") == ["yaml"]
    assert complete(env, str(script), "corral -n shop ge") == ["get"]
    assert complete(env, str(script), "corral patch rc web --type ") == [
        "strategic",
        "merge",
        "json",
    ]
    # names of live objects, from the cluster
    assert corral("apply", "-f", "-", stdin=POD.replace("box", "alpha")).returncode == 0
    assert corral("apply", "-f", "-", stdin=POD.replace("box", "beta")).returncode == 0
    assert complete(env, str(script), "corral logs a") == ["alpha"]
    assert complete(env, str(script), "corral describe pods ") == ["alpha", "beta"]
    assert "default" in complete(env, str(script), "corral get pods -n ")


@pytest.mark.skipif(not Path("/usr/bin/zsh").exists(), reason="zsh is not installed")
def test_zsh_completion_offers_what_bash_does(corral, env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """zsh runs the same function through bashcompinit; zsh's own completion filters
    the candidates by the word typed, so the test filters them the same way."""
    script = tmp_path / "_corral"
    script.write_text(corral("completion", "zsh").stdout)
    for line, want in (
        ("corral ge", ["get"]),
        ("corral get pods --watch-o", ["--watch-only"]),
        ("corral network s", ["set", "show"]),
        ("corral get pods -o ", ["wide", "json", "yaml", "name"]),
        ("corral get po", ["po", "pod", "pods"]),
    ):
        words = line.split(" ")
        prog = (
            f"source {script}\n"
            f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
            '_corral; print -rl -- "${COMPREPLY[@]}"\n'
        )
        r = subprocess.run(
            ["zsh", "-f", "-c", prog], env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0 and not r.stderr, r.stderr
        offered = [w for w in r.stdout.split() if w.startswith(words[-1])]
        assert offered == want, (line, r.stdout)


def test_every_help_has_examples_that_parse() -> None:
    import argparse
    import shlex

    from corral.cli.common import CLIError
    from corral.cli.main import build_parser, parse

    parser = build_parser()
    seen = []

    def walk(p: argparse.ArgumentParser) -> None:
        seen.append(p.prog)
        assert p.epilog and p.epilog.startswith("examples:"), f"{p.prog} --help has no examples"
        assert "examples:" in p.format_help()
        for line in p.epilog.splitlines()[1:]:
            line = line.strip()
            if not line.startswith("corral ") or "--help" in line:
                continue
            words = shlex.split(line)[1:]
            words = words[: words.index(">")] if ">" in words else words  # the shell's
            try:
                parse(parser, words)
            except CLIError as e:
                raise AssertionError(f"{p.prog}: example {line!r} does not parse: {e}") from None
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in set(action.choices.values()):
                    walk(child)

    walk(parser)
    assert {"corral get", "corral patch", "corral network show", "corral completion"} <= set(seen)


# ------------------------------------------------------------ logs -f


def test_logs_follow_prints_new_output_until_the_pod_goes(
    corral, watcher, etcd_url, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from corral.node.procs import start_time
    from corral.runtime.podstatus import ANN_CONTAINERS, ANN_RUNTIME
    from tests.control_helpers import make_pod

    proc = subprocess.Popen(["sleep", "300"])
    try:
        logs = tmp_path / "pod" / "logs" / "main"
        logs.mkdir(parents=True)
        log = logs / "0.log"
        log.write_text("one\ntwo\n")
        pod = make_pod("box")
        pod.metadata.annotations[ANN_CONTAINERS] = json.dumps(
            {"main": {"pid": proc.pid, "started": start_time(proc.pid)}}
        )
        pod.metadata.annotations[ANN_RUNTIME] = json.dumps(
            {"node": "n1", "pid": proc.pid, "podDir": str(tmp_path / "pod")}
        )
        pod.status.container_statuses = [
            ContainerStatus(name="main", state={"running": {"startedAt": "now"}})
        ]
        on_store(etcd_url, lambda s: s.put(pod))

        out = watcher("logs", "-f", "box")
        assert out.until(lambda line: line == "two") == "two"
        with open(log, "a") as f:
            f.write("three\n")
        assert out.until(lambda line: line == "three") == "three"  # followed, not re-read
        assert out.seen == ["one", "two", "three"]
        on_store(etcd_url, lambda s: s.delete(Pod, "box", "default"))
        deadline = time.monotonic() + 30
        p = None
        while time.monotonic() < deadline:
            p = out.proc.poll()
            if p is not None:
                break
            time.sleep(0.2)
        assert p == 0, "logs -f did not end when its pod was deleted"
    finally:
        proc.kill()
        proc.wait()
