"""kubectl's habits in `corral`, against a real etcd: `-o json|yaml` prints a `List`
for every list query and the bare object for one NAME; flags go anywhere before
`--` and everything after `--` is the command's own."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.api.objects import Pod, Service
from corral.api.store import Store
from corral.cli.main import build_parser, main, parse
from corral.node.procs import start_time
from corral.runtime.podstatus import ANN_CONTAINERS, ANN_RUNTIME
from tests.control_helpers import make_pod
from tests.etcd_helpers import on_store

NS = "shop"


@pytest.fixture
def corral(etcd_url: str, capfd: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`corral ARGS` in this process; capfd also catches what exec's child prints."""

    def invoke(*argv: str) -> tuple[int, str, str]:
        capfd.readouterr()
        rc = main(["--etcd", etcd_url, *argv])
        out, err = capfd.readouterr()
        return rc, out, err

    return invoke


def service(name: str, ns: str = NS) -> Service:
    return Service.model_validate(
        {
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
        }
    )


def put(url: str, *objs: Any) -> None:
    async def go(s: Store) -> None:
        for o in objs:
            await s.put(o)

    on_store(url, go)


def load(fmt: str, text: str) -> Any:
    return json.loads(text) if fmt == "json" else yaml.safe_load(text)


# ------------------------------------------------------------ -o json|yaml


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_a_list_query_is_always_a_list_and_a_name_is_the_object(corral, etcd_url, fmt) -> None:  # type: ignore[no-untyped-def]
    def listed(*argv: str) -> list[str]:
        rc, out, err = corral("get", "svc", "-n", NS, "-o", fmt, *argv)
        assert rc == 0, err
        doc = load(fmt, out)
        assert doc["apiVersion"] == "v1" and doc["kind"] == "List", doc
        assert doc["metadata"] == {"resourceVersion": ""}
        return [item["metadata"]["name"] for item in doc["items"]]

    assert listed() == []  # zero: still a List, and nothing on stderr to parse around
    put(etcd_url, service("a"))
    assert listed() == ["a"]  # one: a List too, so scripts need no special case
    put(etcd_url, service("b"), service("c"))
    assert listed() == ["a", "b", "c"]
    assert listed("-l", "app=b") == ["b"]
    assert listed("c", "a") == ["c", "a"]  # several names: a List, in the order asked

    rc, out, err = corral("get", "svc", "b", "-n", NS, "-o", fmt)
    assert rc == 0, err
    doc = load(fmt, out)
    assert doc["kind"] == "Service" and doc["metadata"]["name"] == "b"

    rc, _, err = corral("get", "svc", "nope", "-n", NS, "-o", fmt)
    assert rc == 1 and "services 'nope' not found in namespace 'shop'" in err


def test_network_show_json_is_one_object(corral) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = corral("network", "show", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert "spec" in doc and "leases" in doc and "items" not in doc


# ------------------------------------------------------------ flags anywhere


@pytest.mark.parametrize(
    "argv",
    [
        ["get", "svc", "-n", NS, "web", "-o", "name"],
        ["get", "-n", NS, "svc", "web", "-o", "name"],
        ["get", "-o", "name", "svc", "web", f"--namespace={NS}"],
        ["-n", NS, "get", "svc", "web", "-o", "name"],  # kubectl's `kubectl -n NS get ...`
        ["get", "svc", "-o", "name", "-n", NS, "--", "web"],
    ],
)
def test_get_takes_flags_anywhere(corral, etcd_url, argv) -> None:  # type: ignore[no-untyped-def]
    put(etcd_url, service("web"), service("web", ns="default"), service("other"))
    rc, out, err = corral(*argv)
    assert rc == 0, err
    assert out.split() == ["services/web"]


def test_get_json_with_the_namespace_before_the_kind(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    put(etcd_url, service("web"))
    rc, out, err = corral("get", "-n", NS, "svc", "web", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["kind"] == "Service" and doc["metadata"]["namespace"] == NS


def test_describe_and_delete_take_flags_after_the_names(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    put(etcd_url, service("a"), service("b"), make_pod("p", namespace=NS))
    rc, out, err = corral("describe", "svc", "a", "-n", NS)
    assert rc == 0, err
    assert "Name:" in out and "a" in out

    rc, out, err = corral("delete", "svc", "a", "b", "-n", NS)
    assert rc == 0, err
    assert out.splitlines() == ["service/a deleted", "service/b deleted"]
    rc, out, err = corral("delete", "svc", "a", "-n", NS, "--ignore-not-found")
    assert rc == 0 and out == "", err
    rc, out, err = corral("delete", "pod", "p", "--force", "-n", NS, "--grace-period", "0")
    assert rc == 0 and out.strip() == "pod/p deleted", err
    assert on_store(etcd_url, lambda s: s.get(Pod, "p", NS)) is None


def test_run_keeps_the_commands_own_flags(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    assert corral("create", "namespace", NS)[0] == 0
    rc, _, err = corral(
        "run", "--port", "80", "tool", "-n", NS, "--command", "--", "ls", "-n", "-c"
    )
    assert rc == 0, err
    pod = on_store(etcd_url, lambda s: s.get(Pod, "tool", NS))
    assert pod.spec.containers[0].command == ["ls", "-n", "-c"]
    assert pod.spec.containers[0].ports[0].container_port == 80


@pytest.fixture
def running_pod(etcd_url: str, tmp_path: Path) -> Iterator[Pod]:
    """A pod in NS whose container is a `sleep` on this machine, as a node's runtime
    records it, with a log file: what `corral exec` and `corral logs` need."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        logs = tmp_path / "pod" / "logs" / "main"
        logs.mkdir(parents=True)
        (logs / "0.log").write_text("one\ntwo\nthree\n")
        pod = make_pod("box", namespace=NS)
        pod.metadata.annotations[ANN_CONTAINERS] = json.dumps(
            {"main": {"pid": proc.pid, "started": start_time(proc.pid)}}
        )
        pod.metadata.annotations[ANN_RUNTIME] = json.dumps(
            {"node": "n1", "pid": proc.pid, "podDir": str(tmp_path / "pod")}
        )
        put(etcd_url, pod)
        yield pod
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="nsenter into a process needs root")
def test_exec_gives_the_command_everything_after_the_dashes(corral, running_pod) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = corral(
        "exec", "box", "-n", NS, "--", "sh", "-c", 'printf "<%s>" "$0" "$@"', "-n", "-c"
    )
    assert rc == 0, err
    assert out == "<-n><-c>"
    rc, out, err = corral("exec", "-n", NS, "-c", "main", "box", "--", "sh", "-c", "exit 3")
    assert rc == 3, err


def test_logs_take_the_namespace_before_the_pod(corral, running_pod) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = corral("logs", "-n", NS, "box")
    assert rc == 0, err
    assert out == "one\ntwo\nthree\n"
    rc, out, err = corral("logs", "box", "--tail", "1", "-n", NS)
    assert rc == 0 and out == "three\n", err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["get", "svc", "--bogus"], ["unrecognized arguments: --bogus", "corral get --help"]),
        (["get", "-n"], ["-n/--namespace: expected one argument"]),
        (["get", "svc", "-o", "xml", "web"], ["-o/--output: invalid choice: 'xml'"]),
        (
            ["exec", "box", "ls", "-l"],
            ["unrecognized arguments: -l", "its own flags go after `--`"],
        ),
        (["exec", "box", "-n", NS], ["no command given: corral exec POD -- CMD"]),
        (["logs", "-n", NS], ["required: POD"]),
        (["network", "show", "--", "x"], ["unrecognized arguments: -- x"]),
        (["up", "-n", NS], ["corral up: unrecognized arguments: -n shop"]),
    ],
)
def test_bad_flags_are_named(corral, argv, needles) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = corral(*argv)
    assert rc != 0
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------ parsing alone (no etcd)


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (
            ["node-exec", "node-1", "--name", "c1", "--", "ip", "-n", "x", "--name", "y"],
            {"node": "node-1", "name": "c1", "cmd": ["ip", "-n", "x", "--name", "y"]},
        ),
        (["node-exec", "2", "--", "--", "-x"], {"node": "2", "cmd": ["--", "-x"]}),
        (
            ["exec", "-c", "side", "box", "-n", NS, "--", "ls", "-c", "-h"],
            {"pod": "box", "container": "side", "namespace": NS, "cmd": ["ls", "-c", "-h"]},
        ),
        (["exec", "box", "sh"], {"pod": "box", "cmd": ["sh"]}),  # no flags: `--` may be left out
        (
            ["run", "--replicas", "2", "web", "-l", "a=b", "--", "srv", "-l", "--replicas", "9"],
            {
                "name": "web",
                "replicas": 2,
                "labels": "a=b",
                "cmd": ["srv", "-l", "--replicas", "9"],
            },
        ),
        (
            ["scale", "--replicas", "3", "rc", "web", "-n", NS],
            {"target": ["rc", "web"], "replicas": 3, "namespace": NS},
        ),
        (["expose", "rc", "web", "-n", NS, "--port", "80"], {"target": ["rc", "web"], "port": 80}),
        (["apply", "-f", "a.yaml", "-n", NS, "-f", "b.yaml"], {"filename": ["a.yaml", "b.yaml"]}),
        (["get", "pods", "-v", "-v"], {"verbose": 2}),
        (["-v", "get", "pods"], {"verbose": 1}),
        (["get", "pods", "--etcd", "http://127.0.0.1:1"], {"etcd": "http://127.0.0.1:1"}),
        (["--etcd", "http://127.0.0.1:1", "-n", NS, "get", "pods"], {"namespace": NS}),
    ],
)
def test_parse(argv: list[str], want: dict[str, Any]) -> None:
    args = parse(build_parser(), argv)
    assert {k: getattr(args, k) for k in want} == want
