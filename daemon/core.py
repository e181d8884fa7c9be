"""`Daemon`: the one way every corral daemon starts, supervises its parts and stops.

    d = Daemon("scheduler", node, store, http_addr=("127.0.0.1", 10272))
    d.add("scheduler", Restartable(lambda: Scheduler(store)))
    await d.run()

What it does, in order: give the logs the daemon format, catch SIGTERM/SIGINT,
serve `/metrics` `/healthz` `/readyz` and the debug socket, connect to etcd
(retrying forever, saying why it waits), run the `on_connected` hooks, start
each component in order (`start()`; an exception there aborts the daemon, as a
configuration error should), then supervise every component's `run()`: a
failure is logged and the component restarted with exponential backoff, and
while it is crash-looping `/healthz` fails naming it and its last error. Stop
cancels the runs, calls `stop()` in reverse order and closes the store.

A component is any object with `async run()`; optional: `async start()`,
`async stop()`, `ready() -> bool` (for `/readyz`) and `debug_state() -> dict`
(for the debug socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from corral.api.informer import InformerFactory
from corral.api.store import Store, Unavailable
from corral.common.supervisor import cancel_and_wait
from corral.daemon import logs, metrics
from corral.daemon.debug import DebugServer
from corral.daemon.health import Check, ComponentState, EtcdState, Report
from corral.daemon.http import HTTPServer

log = logging.getLogger("corral.daemon")


@dataclass
class Timings:
    """Supervision and probe timings; the defaults are production's, tests shorten them."""

    restart_initial: float = 1.0  # first restart delay, doubling ...
    restart_max: float = 30.0  # ... up to this
    stable_after: float = 30.0  # a restarted component is healthy again after running this long
    etcd_probe_interval: float = 5.0
    etcd_probe_timeout: float = 5.0

    @property
    def etcd_max_age(self) -> float:
        return 2 * self.etcd_probe_interval + self.etcd_probe_timeout


class Restartable:
    """A component made afresh by `factory()` for every run (for objects that run once)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self.current: Any = None

    async def run(self) -> None:
        self.current = self.factory()
        await self.current.run()

    def ready(self) -> bool:
        fn = getattr(self.current, "ready", None)
        return self.current is not None and (fn is None or bool(fn()))

    def debug_state(self) -> dict[str, Any]:
        fn = getattr(self.current, "debug_state", None)
        return fn() if fn is not None else {}


class Informers:
    """A process's shared informers as a component: started before the components
    that read them, ready once every informer has its first list, stopped last."""

    def __init__(self, factory: InformerFactory) -> None:
        self.factory = factory

    async def start(self) -> None:
        self.factory.start()

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        await self.factory.stop()

    def ready(self) -> bool:
        return self.factory.has_synced

    def debug_state(self) -> dict[str, Any]:
        return {"informers": self.factory.stats()}


class Daemon:
    def __init__(
        self,
        name: str,
        node: str,
        store: Store,
        *,
        http_addr: tuple[str, int] | None = None,
        debug_socket: str | None = None,
        timings: Timings | None = None,
        handle_signals: bool = True,
        configure_logging: bool = False,
    ) -> None:
        self.name, self.node, self.store = name, node, store
        self.http_addr = http_addr
        self.debug_socket = debug_socket
        self.timings = timings or Timings()
        self.handle_signals = handle_signals
        self.configure_logging = configure_logging
        self.components: dict[str, Any] = {}
        self.states: dict[str, ComponentState] = {}
        self.etcd = EtcdState(endpoint=store.url)
        self.on_connected: list[Callable[[], Awaitable[None]]] = []
        self.http: HTTPServer | None = None
        self.debug: DebugServer | None = None
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._connected = False

    # ------------------------------------------------------------ composing

    def add(self, name: str, component: Any) -> None:
        """Add a component; components start in the order they were added."""
        if name in self.components:
            raise ValueError(f"component {name!r} added twice")
        self.components[name] = component
        self.states[name] = ComponentState(name)
        metrics.COMPONENT_HEALTHY.labels(name).set(0)

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------ health

    def health(self) -> Report:
        now = time.monotonic()
        checks = [self.etcd.check(self.timings.etcd_max_age, now)]
        for name, st in self.states.items():
            st.settle(self.timings.stable_after, now)
            why = st.failing(self.timings.stable_after, now)
            metrics.COMPONENT_HEALTHY.labels(name).set(0 if why else 1)
            checks.append(Check(f"component/{name}", why is None, why or ""))
        return Report(checks)

    def readiness(self) -> Report:
        report = self.health()
        for name, comp in self.components.items():
            st = self.states[name]
            if not st.started:
                report.checks.append(Check(f"ready/{name}", False, f"not started ({st.state})"))
                continue
            fn = getattr(comp, "ready", None)
            ok = True
            if fn is not None:
                try:
                    ok = bool(fn())
                except Exception as e:
                    ok = False
                    log.debug("ready() of %s failed: %s", name, e)
            report.checks.append(Check(f"ready/{name}", ok, "" if ok else "not ready yet"))
        return report

    def failing_components(self) -> list[Check]:
        """The component checks that fail (for the node's Ready condition)."""
        return [c for c in self.health().failures() if c.name.startswith("component/")]

    def debug_state(self) -> dict[str, Any]:
        health, ready = self.health(), self.readiness()
        comps: dict[str, Any] = {}
        for name, comp in self.components.items():
            entry = self.states[name].as_dict()
            fn = getattr(comp, "debug_state", None)
            if fn is not None:
                try:
                    entry["state"] = self.states[name].state
                    entry["debug"] = fn()
                except Exception as e:
                    entry["debug"] = {"error": f"{type(e).__name__}: {e}"}
            comps[name] = entry
        return {
            "daemon": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "startedAt": self.started_at,
            "etcd": {"endpoint": self.store.url, "ok": self.etcd.ok, "message": self.etcd.message},
            "http": self.http.address if self.http else None,
            "healthy": health.ok,
            "ready": ready.ok,
            "checks": [c.line() for c in ready.checks],
            "components": comps,
        }

    def resync(self) -> dict[str, Any]:
        """Ask every component with a `resync()` for a full repair pass now."""
        asked = []
        for name, comp in self.components.items():
            fn = getattr(comp, "resync", None) or getattr(
                getattr(comp, "current", None), "resync", None
            )
            if fn is not None:
                fn()
                asked.append(name)
        return {"resync": asked}

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or `request_stop()`; always cleans up."""
        if self.configure_logging:
            logs.setup(self.name, self.node)
        metrics.DAEMON_INFO.labels(self.name, self.node).set(1)
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        main = asyncio.create_task(self._main(), name=f"{self.name}-main")
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([main, stop], return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                main.result()  # a start-up error: raise it
            else:
                log.info("%s stopping", self.name)
        finally:
            stop.cancel()
            main.cancel()
            await asyncio.gather(main, return_exceptions=True)
            await self._shutdown()
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _main(self) -> None:
        await self._start_servers()
        await self.connect()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="etcd-probe"))
        for hook in self.on_connected:
            await hook()
        for name, comp in self.components.items():
            st = self.states[name]
            st.state = "starting"
            start = getattr(comp, "start", None)
            if start is not None:
                await start()
            st.started = True
            log.info("component %s started", name)
            self._tasks.append(asyncio.create_task(self._supervise(name, comp), name=name))
        log.info("%s running (%s)", self.name, ", ".join(self.components) or "no components")
        await asyncio.Event().wait()

    async def _start_servers(self) -> None:
        if self.http_addr is not None:
            host, port = self.http_addr
            http = HTTPServer(host, port, self.health, self.readiness)
            try:
                await http.start()
                self.http = http
                log.info("serving /metrics, /healthz, /readyz on http://%s", http.address)
            except OSError as e:
                log.error(
                    "cannot serve metrics and health on %s:%d (%s); running without them "
                    "(choose another with --metrics-addr, or 'off')",
                    host,
                    port,
                    e.strerror or e,
                )
        if self.debug_socket:
            debug = DebugServer(
                self.debug_socket, self.debug_state, actions={"resync": self.resync}
            )
            try:
                await debug.start()
                self.debug = debug
                log.info("debug state on %s", self.debug_socket)
            except (OSError, RuntimeError) as e:
                log.warning("no debug socket at %s: %s", self.debug_socket, e)

    async def connect(self) -> None:
        """Wait for etcd (it may start after us); never give up, but say why we wait."""
        delay = 0.2
        while True:
            try:
                await self.store.connect()
                break
            except Unavailable as e:
                self.etcd.ok, self.etcd.message = False, str(e)
                log.warning("waiting for etcd: %s (retrying in %.1fs)", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._connected = True
        self.etcd.endpoint = self.store.url
        self.etcd.ok, self.etcd.message, self.etcd.last_ok = True, "", time.monotonic()
        metrics.ETCD_UP.set(1)
        log.info("%s connected to etcd %s", self.name, self.store.url)

    async def _probe_once(self) -> None:
        await self.store.revision()

    async def _probe_loop(self) -> None:
        """A cheap read every interval; a probe that does not answer in time is a failure."""
        t = self.timings
        pending: asyncio.Task | None = None
        while True:
            await asyncio.sleep(t.etcd_probe_interval)
            if pending is None or pending.done():
                if pending is not None and not pending.cancelled():
                    pending.exception()  # a probe that answered late: consumed, not news
                pending = asyncio.create_task(self._probe_once())
            done, _ = await asyncio.wait({pending}, timeout=t.etcd_probe_timeout)
            was_ok = self.etcd.ok
            if not done:
                self.etcd.ok = False
                self.etcd.message = (
                    f"{self.store.url} did not answer within {t.etcd_probe_timeout:.0f}s"
                )
            elif (e := pending.exception()) is not None:
                self.etcd.ok = False
                self.etcd.message = f"{self.store.url}: {type(e).__name__}: {e}"
            else:
                self.etcd.ok, self.etcd.message = True, ""
                self.etcd.last_ok = time.monotonic()
                self.etcd.endpoint = self.store.url
            metrics.ETCD_UP.set(1 if self.etcd.ok else 0)
            if was_ok != self.etcd.ok:
                if self.etcd.ok:
                    log.info("etcd answers again (%s)", self.store.url)
                else:
                    log.warning("etcd health check failed: %s", self.etcd.message)

    async def _supervise(self, name: str, comp: Any) -> None:
        st = self.states[name]
        t = self.timings
        delay = t.restart_initial
        while True:
            st.state, st.running_since = "running", time.monotonic()
            try:
                await comp.run()
                raise RuntimeError("run() returned")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                ran = time.monotonic() - (st.running_since or 0)
                if ran >= t.stable_after:
                    delay, st.failures = t.restart_initial, 0
                st.failures += 1
                st.restarts += 1
                st.last_error = f"{type(e).__name__}: {e}"
                st.last_failure = time.monotonic()
                st.state = "backoff"
                metrics.COMPONENT_RESTARTS.labels(name).inc()
                metrics.COMPONENT_HEALTHY.labels(name).set(0)
                log.error(
                    "component %s failed (%s); restarting it in %.0fs",
                    name,
                    st.last_error,
                    delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, t.restart_max)

    async def _shutdown(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        for name in reversed(list(self.components)):
            st = self.states[name]
            if not st.started:
                continue
            stop = getattr(self.components[name], "stop", None)
            if stop is not None:
                try:
                    await stop()
                except Exception:
                    log.exception("component %s failed to stop cleanly", name)
            st.state = "stopped"
        for server in (self.http, self.debug):
            if server is not None:
                await server.stop()
        self.http = self.debug = None
        with contextlib.suppress(Exception):
            await self.store.close()
