"""The daemon skeleton: health following crash loops and etcd, readiness, debug socket, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.api.objects import Node
from corral.api.store import Store
from corral.cluster import health
from corral.cluster.etcd import LocalEtcd
from corral.daemon import debug as debug_client
from corral.daemon.core import Daemon, Timings
from corral.daemon.nodecontext import NodeContext
from corral.daemon.options import PORTS, parse_addr
from corral.node.context import NodePaths
from tests import kit
from tests.etcd_helpers import running_etcd

FAST = Timings(
    restart_initial=0.05,
    restart_max=0.2,
    stable_after=0.5,
    etcd_probe_interval=0.2,
    etcd_probe_timeout=0.5,
)


class Flaky:
    """A component that fails on demand, with readiness and debug state."""

    def __init__(self) -> None:
        self.broken: str | None = None
        self.is_ready = True
        self.runs = 0

    async def run(self) -> None:
        self.runs += 1
        while True:
            if self.broken:
                raise OSError(self.broken)
            await asyncio.sleep(0.02)

    def ready(self) -> bool:
        return self.is_ready

    def debug_state(self) -> dict[str, Any]:
        return {"runs": self.runs, "broken": self.broken}


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def get(d: Daemon, path: str) -> tuple[int, str]:
    assert d.http is not None
    return await asyncio.to_thread(_get, f"http://127.0.0.1:{d.http.port}{path}")


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    await kit.eventually(check, what, timeout)


async def status_is(d: Daemon, path: str, code: int, text: str = "") -> bool:
    got, body = await get(d, path + "?verbose")
    return got == code and text in body


@contextlib.asynccontextmanager
async def running(d: Daemon) -> AsyncIterator[asyncio.Task]:
    task = asyncio.create_task(d.run())
    try:
        await eventually(
            lambda: _true(d.http is not None and all(s.started for s in d.states.values())),
            "the daemon to start",
        )
        yield task
    finally:
        d.request_stop()
        await asyncio.wait_for(task, 30)


async def _true(v: bool) -> bool:
    if not v:
        await asyncio.sleep(0)
    return v


def make(store: Store, tmp: str, **kw: Any) -> Daemon:
    return Daemon(
        "test",
        "node-x",
        store,
        http_addr=("127.0.0.1", 0),
        debug_socket=os.path.join(tmp, "run", "debug.sock"),
        timings=FAST,
        handle_signals=False,
        **kw,
    )


# ------------------------------------------------------------ flags


def test_parse_addr() -> None:
    assert parse_addr("10.0.0.1:9000", "127.0.0.1", 1) == ("10.0.0.1", 9000)
    assert parse_addr("9000", "127.0.0.1", 1) == ("127.0.0.1", 9000)
    assert parse_addr(":9000", None, 1) == ("", 9000)
    assert parse_addr("10.0.0.1", None, 10271) == ("10.0.0.1", 10271)
    assert parse_addr("off", "127.0.0.1", 1) is None
    assert parse_addr("0", "127.0.0.1", 1) is None
    for bad in ("host:x", "1.2.3.4:70000", "example.com:80"):
        with pytest.raises(ValueError):
            parse_addr(bad, "127.0.0.1", 1)
    assert len(set(PORTS.values())) == len(PORTS)
    assert not {2379, 2380} & set(PORTS.values())


# ------------------------------------------------------------ health


async def test_healthz_fails_while_a_component_crash_loops(etcd: LocalEtcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    comp = Flaky()
    d = make(Store(etcd.url), str(tmp_path))
    d.add("flaky", comp)
    async with running(d):
        await eventually(lambda: status_is(d, "/healthz", 200), "healthy")
        await eventually(lambda: status_is(d, "/readyz", 200), "ready")

        comp.broken = "the disk is on fire"
        await eventually(
            lambda: status_is(d, "/healthz", 503, "[-]component/flaky failed"), "unhealthy"
        )
        _, body = await get(d, "/healthz?verbose")
        assert "the disk is on fire" in body and "[+]etcd ok" in body
        assert (await get(d, "/readyz"))[0] == 503
        assert d.states["flaky"].restarts >= 1
        assert d.http is not None  # what `corral status` shows for it
        why = await asyncio.to_thread(
            health.daemon_healthz, f"http://127.0.0.1:{d.http.port}/healthz"
        )
        assert why.startswith("component/flaky failed: ") and "the disk is on fire" in why

        comp.broken = None  # repaired: healthy once it has run stable_after
        await eventually(lambda: status_is(d, "/healthz", 200), "healthy again")
        await eventually(lambda: status_is(d, "/readyz", 200), "ready again")


async def test_readyz_waits_for_component_readiness(etcd: LocalEtcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    comp = Flaky()
    comp.is_ready = False
    d = make(Store(etcd.url), str(tmp_path))
    d.add("flaky", comp)
    async with running(d):
        await eventually(lambda: status_is(d, "/healthz", 200), "healthy")
        code, body = await get(d, "/readyz?verbose")
        assert code == 503 and "[-]ready/flaky failed" in body
        comp.is_ready = True
        await eventually(lambda: status_is(d, "/readyz", 200), "ready")


@pytest.fixture
def own_etcd() -> Iterator[LocalEtcd]:
    """An etcd of this test's own, so freezing it leaves the shared one alone."""
    with running_etcd("etcd-freeze", name="freeze") as server:
        yield server


async def test_healthz_follows_a_frozen_etcd(own_etcd: LocalEtcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert own_etcd.record is not None
    pid = own_etcd.record.pid
    d = make(Store(own_etcd.url, timeout=1.0), str(tmp_path))
    d.add("flaky", Flaky())
    async with running(d):
        await eventually(lambda: status_is(d, "/healthz", 200), "healthy")
        os.kill(pid, signal.SIGSTOP)
        try:
            await eventually(lambda: status_is(d, "/healthz", 503, "[-]etcd failed"), "unhealthy")
            _, body = await get(d, "/metrics")
            up = _samples(body, "corral_etcd_up")
            assert up == [0.0]
        finally:
            os.kill(pid, signal.SIGCONT)
        await eventually(lambda: status_is(d, "/healthz", 200, "[+]etcd ok"), "healthy again")


async def test_waits_for_etcd_and_says_why(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from corral.cluster.etcd import free_port

    d = make(Store(f"http://127.0.0.1:{free_port()}", timeout=0.5), str(tmp_path))
    task = asyncio.create_task(d.run())
    try:
        await eventually(lambda: _true(d.http is not None), "the HTTP server")
        await eventually(lambda: status_is(d, "/healthz", 503, "cannot reach etcd"), "unhealthy")
        await eventually(lambda: _true("waiting for etcd" in caplog.text), "the log line")
    finally:
        d.request_stop()
        await asyncio.wait_for(task, 30)
    assert d.http is None and not os.path.exists(str(tmp_path / "run" / "debug.sock"))


# ------------------------------------------------------------ debug socket and metrics


async def test_debug_socket_is_root_only_and_answers_json(etcd: LocalEtcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = make(Store(etcd.url), str(tmp_path))
    d.add("flaky", Flaky())
    path = str(tmp_path / "run" / "debug.sock")
    async with running(d):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        doc = await asyncio.to_thread(debug_client.query, path)
        assert doc["daemon"] == "test" and doc["node"] == "node-x"
        assert doc["components"]["flaky"]["debug"]["runs"] >= 1
        assert doc["components"]["flaky"]["state"] == "running"
        assert doc["etcd"]["endpoint"] == etcd.url
    assert not os.path.exists(path)  # removed on stop


def _samples(text: str, name: str, **labels: str) -> list[float]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s.value)
    return out


async def test_metrics_parse_and_count_etcd_requests(etcd: LocalEtcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = Store(etcd.url)
    d = make(store, str(tmp_path))
    d.add("flaky", Flaky())
    async with running(d):
        await store.get_raw("/corral/test-daemon/nothing")
        code, body = await get(d, "/metrics")
        assert code == 200
        fams = {f.name for f in text_string_to_metric_families(body)}
        for name in (
            "corral_etcd_request_duration_seconds",
            "corral_component_healthy",
            "corral_etcd_up",
            "corral_daemon_info",
        ):
            assert name in fams, name
        assert _samples(body, "corral_etcd_request_duration_seconds_count", op="get_raw")[0] >= 1
        assert _samples(body, "corral_component_healthy", component="flaky") == [1.0]
        assert _samples(body, "corral_daemon_info", daemon="test", node="node-x") == [1.0]


# ------------------------------------------------------------ the node's Ready condition


async def test_node_ready_follows_component_health(store: Store, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from corral.nodeagent import agent

    comp = Flaky()
    monkeypatch.setattr(agent, "load_component", lambda name, ctx: comp)
    ctx = NodeContext(
        node_name="node-health",
        store=store,
        paths=NodePaths(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state")),
        underlay_ip="127.0.0.1",
        underlay_iface="lo",
    )
    a = agent.NodeAgent(
        ctx, ["flaky"], http_addr=("127.0.0.1", 0), timings=FAST, handle_signals=False
    )

    async def ready() -> tuple[str, str, str]:
        n = await store.get(Node, "node-health")
        c = n.status.condition("Ready") if n else None
        return (c.status, c.reason or "", c.message or "") if c else ("", "", "")

    task = asyncio.create_task(a.run())
    try:
        await eventually(lambda: _ready_is(ready, "True"), "Ready=True")
        comp.broken = "cannot bind /run/corral/cni.sock"
        await eventually(lambda: _ready_is(ready, "False"), "Ready=False")
        _, reason, message = await ready()
        assert reason == "ComponentFailing"
        assert "flaky" in message and "cannot bind /run/corral/cni.sock" in message
        comp.broken = None
        await eventually(lambda: _ready_is(ready, "True"), "Ready=True again")
        assert a.daemon.debug is not None  # the node's own debug socket, in its run dir
        assert os.path.exists(ctx.paths.debug_socket)
    finally:
        a.request_stop()
        await asyncio.wait_for(task, 30)


async def _ready_is(ready: Callable[[], Awaitable[tuple[str, str, str]]], want: str) -> bool:
    return (await ready())[0] == want


# ------------------------------------------------------------ store metrics


def _value(name: str, **labels: str) -> float:
    from corral.common.metrics import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_store_counts_watch_relists_and_errors(store: Store) -> None:
    from corral.api.store import StoreError
    from corral.cluster.etcd import free_port

    before = _value("corral_etcd_watch_restarts_total", reason="compacted")
    start = await store.revision() + 1
    await store.put_raw("/corral/wtest/a", b"1")
    await store.put_raw("/corral/wtest/a", b"2")
    await store.compact(await store.revision())
    async for ev in store.watch_prefix_raw("/corral/wtest/", start, {}):
        assert ev.key == "/corral/wtest/a" and ev.value == b"2"  # the re-list's view
        break
    assert _value("corral_etcd_watch_restarts_total", reason="compacted") == before + 1

    dead = Store(f"http://127.0.0.1:{free_port()}", timeout=0.5)
    errors = _value("corral_etcd_request_errors_total", op="get_raw", error="Unavailable")
    with pytest.raises(StoreError):
        await dead.get_raw("/corral/x")
    assert (
        _value("corral_etcd_request_errors_total", op="get_raw", error="Unavailable") == errors + 1
    )
    await dead.close()
