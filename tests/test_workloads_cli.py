"""`corral run/expose/scale/describe` and the `corral scheduler`/`corral controllers`
daemons, driven as a user would, against a real etcd."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from corral.api.objects import Endpoints, Node, Pod, ReplicationController, Service
from corral.api.store import Store
from corral.cli.main import main
from corral.control.conditions import set_pod_condition
from tests import kit
from tests.control_helpers import make_node, make_pod, set_pod_running
from tests.etcd_helpers import on_store


@pytest.fixture
def corral(
    etcd_url: str, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    def invoke(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(["--etcd", etcd_url, *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return invoke


def get(url: str, kind: Any, name: str, ns: str | None = "default") -> Any:
    return on_store(url, lambda s: s.get(kind, name, ns))


def test_run_makes_a_pod_or_a_replication_controller(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    rc, out, _ = corral("run", "single", "--env", "A=1", "--command", "--", "sleep", "100")
    assert rc == 0 and out.strip() == "pod/single created"
    pod = get(etcd_url, Pod, "single")
    assert pod.metadata.labels == {"run": "single"}
    c = pod.spec.containers[0]
    assert c.name == "single" and c.command == ["sleep", "100"] and c.env[0].value == "1"

    rc, out, _ = corral(
        "run",
        "web",
        "--replicas",
        "3",
        "--port",
        "8080",
        "--requests",
        "cpu=100m,memory=64Mi",
        "--limits",
        "memory=128Mi",
        "--command",
        "--",
        "python3",
        "-m",
        "http.server",
        "8080",
    )
    assert rc == 0 and out.strip() == "replicationcontroller/web created"
    web = get(etcd_url, ReplicationController, "web")
    assert web.spec.replicas == 3 and web.spec.selector == {"run": "web"}
    c = web.spec.template.spec.containers[0]
    assert c.command == ["python3", "-m", "http.server", "8080"]
    assert c.ports[0].container_port == 8080
    assert c.resources.requests == {"cpu": "100m", "memory": "64Mi"}

    rc, out, _ = corral("run", "api", "--port", "9000", "--expose", "--", "srv")
    assert rc == 0 and "pod/api created" in out and "service/api created" in out
    svc = get(etcd_url, Service, "api")
    assert svc.spec.selector == {"run": "api"} and svc.spec.ports[0].port == 9000
    assert svc.spec.cluster_ip
    rc, _, err = corral("run", "noport", "--expose", "--", "srv")
    assert rc == 1 and "--expose needs --port" in err
    assert get(etcd_url, Pod, "noport") is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "x", "--requests", "cpu=lots", "--", "sleep", "1"], "--requests: cpu"),
        (["run", "x", "--requests", "gpu=1", "--", "sleep", "1"], "unknown resource 'gpu'"),
        (["run", "x", "--replicas", "-2", "--", "sleep", "1"], "--replicas -2"),
        (["run", "x", "--command"], "a command is required"),
        (["run", "Bad_Name", "--", "sleep", "1"], "NAME 'Bad_Name' must be a DNS label"),
        (["run", "x", "--nope", "--", "sleep", "1"], "unrecognized arguments: --nope"),
        (["run", "x", "--port", "70000", "--", "sleep", "1"], "containerPort"),
        (["scale", "rc", "nothere", "--replicas", "1"], "no ReplicationController named"),
        (["expose", "nothere", "--port", "80"], "no ReplicationController or Deployment or Pod"),
        (["describe", "widgets", "x"], "unknown resource type 'widgets'"),
    ],
)
def test_user_mistakes_are_named_and_change_nothing(corral, etcd_url, argv, needle) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = corral(*argv)
    assert rc != 0 and needle in err and "Traceback" not in err
    pods = on_store(etcd_url, lambda s: s.list(Pod))[0]
    assert pods == []


def test_expose_allocates_a_vip_and_scale_changes_replicas(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    assert corral("run", "web", "--replicas", "2", "--port", "8080", "--", "sleep", "1")[0] == 0
    rc, out, err = corral("expose", "web", "--port", "80")
    assert rc == 0, err
    svc = get(etcd_url, Service, "web")
    assert svc.spec.selector == {"run": "web"}
    assert (svc.spec.ports[0].port, svc.spec.ports[0].target_port) == (80, 8080)
    assert ipaddress.ip_address(svc.spec.cluster_ip) in ipaddress.ip_network("10.96.0.0/12")
    assert out.strip() == f"service/web exposed (clusterIP {svc.spec.cluster_ip})"

    rc, _, err = corral(
        "expose",
        "rc/web",
        "--port",
        "81",
        "--name",
        "web-np",
        "--type",
        "NodePort",
        "--session-affinity",
        "ClientIP",
    )
    assert rc == 0, err
    np = get(etcd_url, Service, "web-np")
    assert 30000 <= np.spec.ports[0].node_port <= 32767
    assert np.spec.session_affinity == "ClientIP" and np.spec.cluster_ip != svc.spec.cluster_ip
    rc, _, err = corral("expose", "web", "--port", "80")
    assert rc == 1 and "already exists" in err

    assert corral("scale", "rc", "web", "--replicas", "5")[0] == 0
    assert get(etcd_url, ReplicationController, "web").spec.replicas == 5
    rc, _, err = corral("scale", "web", "--replicas", "1", "--current-replicas", "2")
    assert rc == 1 and "has 5 replicas" in err
    rc, _, err = corral("scale", "web", "--replicas", "-1")
    assert rc == 1 and "must be 0 or more" in err
    assert get(etcd_url, ReplicationController, "web").spec.replicas == 5


def test_describe_explains_state(corral, etcd_url) -> None:  # type: ignore[no-untyped-def]
    async def setup(s: Store) -> None:
        await s.create(make_node("node-0", cpu="1"))
        pod = make_pod("big", requests={"cpu": "4"})
        set_pod_condition(
            pod.status,
            "PodScheduled",
            "False",
            "Unschedulable",
            "0/1 nodes are available: 1 Insufficient cpu.",
        )
        await s.create(pod)
        await s.create(
            make_pod(
                "small",
                {"app": "x"},
                requests={"cpu": "250m"},
                node_name="node-0",
                ports=[{"containerPort": 80}],
            )
        )
        await set_pod_running(s, "small", "10.244.0.7")
        await s.create(
            Service.model_validate(
                {
                    "metadata": {"name": "x"},
                    "spec": {
                        "selector": {"app": "x"},
                        "clusterIP": "10.96.0.20",
                        "ports": [{"port": 80}],
                    },
                }
            )
        )
        await s.create(
            Endpoints.model_validate(
                {
                    "metadata": {"name": "x"},
                    "subsets": [{"addresses": [{"ip": "10.244.0.7"}], "ports": [{"port": 80}]}],
                }
            )
        )

    on_store(etcd_url, setup)
    rc, out, _ = corral("describe", "pod", "big")
    assert rc == 0 and "0/1 nodes are available: 1 Insufficient cpu." in out
    rc, out, _ = corral("describe", "node", "node-0")
    assert rc == 0 and "250m (25%)" in out and "small" in out
    rc, out, _ = corral("describe", "svc", "x")
    assert rc == 0 and "10.244.0.7:80" in out and "10.96.0.20" in out


# ---------------------------------------------------------------- the daemons


def _daemon_flags(tmp_path: Any, name: str) -> list[str]:
    """Keep test daemons off the host's /run/corral and fixed ports (others run in parallel)."""
    return ["--metrics-addr", "off", "--debug-socket", str(tmp_path / f"{name}-debug.sock")]


def _start(argv: list[str], log: str) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "corral", *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    return kit.wait_for(check, str(check), timeout, interval=0.1)


def test_scheduler_and_controllers_daemons(corral, etcd_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def nodes(s: Store) -> None:
        for i in range(3):
            await s.create(make_node(f"node-{i}"))

    on_store(etcd_url, nodes)
    procs = [
        _start(
            ["scheduler", "--etcd", etcd_url, "--seed", "1", *_daemon_flags(tmp_path, "s")],
            str(tmp_path / "s.log"),
        ),
        _start(
            [
                *("controllers", "--etcd", etcd_url, "--node-monitor-grace", "600"),
                *_daemon_flags(tmp_path, "c"),
            ],
            str(tmp_path / "c.log"),
        ),
    ]
    try:
        assert corral("run", "web", "--replicas", "6", "--port", "8080", "--", "x")[0] == 0
        assert corral("expose", "web", "--port", "80")[0] == 0

        def bound() -> list[Pod] | None:
            pods = on_store(etcd_url, lambda s: s.list(Pod))[0]
            return pods if len(pods) == 6 and all(p.spec.node_name for p in pods) else None

        pods = _wait(bound)
        assert {p.spec.node_name for p in pods} == {"node-0", "node-1", "node-2"}

        async def ready(s: Store) -> None:
            for i, p in enumerate(pods):
                await set_pod_running(s, p.name, f"10.244.{i % 3}.{10 + i}")

        on_store(etcd_url, ready)

        def endpoints() -> bool:
            ep = get(etcd_url, Endpoints, "web")
            return ep is not None and sum(len(s.addresses) for s in ep.subsets) == 6

        _wait(endpoints)
        _wait(lambda: "6 current / 6 desired (6 ready)" in corral("describe", "rc", "web")[1])
        on_store(etcd_url, lambda s: s.delete(Node, "node-2"))

        def moved() -> bool:
            live = on_store(etcd_url, lambda s: s.list(Pod))[0]
            return len(live) == 6 and all(p.spec.node_name in ("node-0", "node-1") for p in live)

        _wait(moved)

        # A Service written by `corral apply` gets its VIP from the controllers, and
        # keeps it when the same manifest (without a clusterIP) is applied again.
        manifest = tmp_path / "svc.yaml"
        manifest.write_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: applied}\n"
            "spec: {selector: {run: web}, ports: [{port: 8080}]}\n"
        )

        def vip() -> str | None:
            return get(etcd_url, Service, "applied").spec.cluster_ip

        assert corral("apply", "-f", str(manifest))[0] == 0
        first = _wait(vip)
        assert ipaddress.ip_address(first) in ipaddress.ip_network("10.96.0.0/12")
        assert corral("apply", "-f", str(manifest))[0] == 0
        assert _wait(vip) == first
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                codes.append("killed")
    logs = [(tmp_path / n).read_text()[-2000:] for n in ("s.log", "c.log")]
    assert codes == [0, 0], logs
