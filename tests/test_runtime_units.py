"""Pure parts of the runtime: probe thresholds, probe handlers on loopback, limits, files."""

from __future__ import annotations

import asyncio
import re

import pytest

from corral.api.objects import Container, ContainerStatus, Pod, Probe
from corral.cli.output import pod_status
from corral.runtime import probes, sandbox, security
from corral.runtime.cgroups import Limits


async def run_loop(probe: Probe, results: list[bool], initial: bool = False) -> list[bool]:
    """Feed `results` through a ProbeLoop; the states it reports, in order."""
    it = iter(results)
    seen: list[bool] = []
    finished = asyncio.Event()

    async def handler() -> tuple[bool, str]:
        try:
            return next(it), "msg"
        except StopIteration:
            finished.set()
            await asyncio.sleep(3600)
            raise

    loop = probes.ProbeLoop(probe, handler, lambda ok, _m: seen.append(ok), initial=initial)
    loop.probe = probe.model_copy(update={"period_seconds": 0})
    task = asyncio.create_task(loop.run())
    await asyncio.wait_for(finished.wait(), 10)
    task.cancel()
    return seen


async def test_probe_thresholds() -> None:
    p = Probe.model_validate(
        {"exec": {"command": ["true"]}, "successThreshold": 2, "failureThreshold": 3}
    )
    # Needs 2 successes in a row to become ready, 3 failures in a row to drop.
    assert await run_loop(
        p, [True, False, True, True, False, False, True, False, False, False]
    ) == [True, False]
    # A probe that never passes reports the failure once (for the message), not every time.
    assert await run_loop(p, [False] * 8) == [False]
    # Liveness starts alive: only a run of failures flips it.
    assert await run_loop(p, [False, False, True, False, False, False], initial=True) == [False]


async def test_tcp_and_http_handlers_on_loopback() -> None:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        line = await r.readline()
        code = 200 if b" /ok " in line else (302 if b" /moved " in line else 500)
        w.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert (await probes.tcp_check("127.0.0.1", port, 1))[0]
        assert (await probes.http_check("127.0.0.1", port, "/ok", 1))[0]
        assert (await probes.http_check("127.0.0.1", port, "/moved", 1))[0]
        ok, msg = await probes.http_check("127.0.0.1", port, "/broken", 1)
        assert not ok and "500" in msg
    finally:
        server.close()
        await server.wait_closed()
    ok, msg = await probes.tcp_check("127.0.0.1", port, 1)
    assert not ok and str(port) in msg
    assert not (await probes.http_check("127.0.0.1", port, "/ok", 1))[0]


def test_named_ports_resolve_against_the_container() -> None:
    c = Container.model_validate(
        {"name": "c", "command": ["x"], "ports": [{"name": "http", "containerPort": 8080}]}
    )
    assert probes.resolve_port("http", c) == 8080
    assert probes.resolve_port(9000, c) == 9000
    with pytest.raises(ValueError, match="no port named 'grpc'"):
        probes.resolve_port("grpc", c)


def test_limits_from_resources() -> None:
    c = Container.model_validate(
        {
            "name": "c",
            "command": ["x"],
            "resources": {
                "requests": {"cpu": "250m", "memory": "32Mi"},
                "limits": {"cpu": "1", "memory": "64Mi"},
            },
        }
    )
    lim = Limits.of(c)
    assert (lim.memory, lim.cpu_quota_millis, lim.cpu_shares) == (64 << 20, 1000, 256)
    none = Limits.of(Container.model_validate({"name": "c", "command": ["x"]}))
    assert (none.memory, none.cpu_quota_millis, none.cpu_shares) == (None, None, 2)


def test_resolv_conf_and_hosts() -> None:
    assert sandbox.resolv_conf("team-a", "10.96.0.10", "cluster.local") == (
        "nameserver 10.96.0.10\n"
        "search team-a.svc.cluster.local svc.cluster.local cluster.local\n"
        "options ndots:5\n"
    )
    assert sandbox.resolv_conf("x", "10.96.0.10", "cluster.local", "None") == ""
    hosts = sandbox.etc_hosts("10.244.1.5", "web-0", "web", "default", "cluster.local")
    assert "127.0.0.1\tlocalhost" in hosts
    assert "10.244.1.5\tweb-0.web.default.svc.cluster.local\tweb-0" in hosts
    assert "10.244.1.5\tweb-0\n" in sandbox.etc_hosts(
        "10.244.1.5", "web-0", None, "default", "cluster.local"
    )


def _pod(spec: dict) -> Pod:
    return Pod.model_validate({"metadata": {"name": "p"}, "spec": spec})


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (
            {
                "initContainers": [{"name": "c", "command": ["true"]}],
                "containers": [{"name": "c", "command": ["x"]}],
            },
            "initContainers: container name 'c' is used twice",
        ),
        (
            {
                "initContainers": [
                    {
                        "name": "i",
                        "command": ["true"],
                        "readinessProbe": {"exec": {"command": ["true"]}},
                    }
                ],
                "containers": [{"name": "c", "command": ["x"]}],
            },
            "initContainers[i].readinessProbe",
        ),
        (
            {"containers": [{"name": "c", "command": ["x"], "lifecycle": {"preStop": {}}}]},
            "lifecycle.preStop needs exactly one of exec or httpGet",
        ),
        (
            {
                "containers": [
                    {"name": "c", "command": ["x"], "lifecycle": {"postStart": {"exec": {}}}}
                ]
            },
            "lifecycle.postStart",
        ),
    ],
)
def test_pod_feature_errors_name_the_field(spec: dict, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        _pod(spec)


def test_get_pods_status_while_init_containers_run() -> None:
    p = _pod(
        {
            "initContainers": [{"name": "a", "command": ["x"]}, {"name": "b", "command": ["x"]}],
            "containers": [{"name": "c", "command": ["x"]}],
        }
    )
    done = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    cases = [
        ([{}, {}], "Init:0/2"),
        ([done, {"running": {}}], "Init:1/2"),
        ([done, {"terminated": {"exitCode": 1, "reason": "Error"}}], "Init:Error"),
        ([done, {"waiting": {"reason": "CrashLoopBackOff"}}], "Init:CrashLoopBackOff"),
    ]
    for states, want in cases:
        p.status.init_container_statuses = [
            ContainerStatus(name=n, state=s) for n, s in zip("ab", states, strict=True)
        ]
        assert pod_status(p) == want, states
    p.status.init_container_statuses = [ContainerStatus(name=n, state=done) for n in "ab"]
    p.status.phase = "Running"
    assert pod_status(p) == "Running"


def test_host_network_containers_lose_net_raw_unless_they_add_it() -> None:
    spec = {"hostNetwork": True, "containers": [{"name": "c", "command": ["x"]}]}
    net_raw = 1 << 13
    assert not security.for_container(_pod(spec), _pod(spec).spec.containers[0], []).caps & net_raw
    spec["containers"][0]["securityContext"] = {"capabilities": {"add": ["NET_RAW"]}}
    p = _pod(spec)
    assert security.for_container(p, p.spec.containers[0], []).caps & net_raw
    p = _pod({"containers": [{"name": "c", "command": ["x"]}]})
    assert security.for_container(p, p.spec.containers[0], []).caps & net_raw
