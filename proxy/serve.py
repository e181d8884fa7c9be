"""`corral proxy`'s daemon: the proxy (proxy/component.py) on the skeleton, with its own
informers (Service, EndpointSlice). `corral proxy` calls `serve`, after the
process-wide steps only a fresh process may take (the eBPF mode's leftovers
removed, capabilities dropped before any thread exists)."""

from __future__ import annotations

from corral.api.informer import InformerFactory
from corral.api.store import Store
from corral.daemon.core import Daemon, Informers
from corral.proxy.component import Proxy


async def serve(
    store: Store,
    node: str,
    *,
    mode: str,
    fallback: bool = False,
    mode_note: str = "",
    min_sync_period: float = 0.1,
    sync_period: float = 30.0,
    http_addr: tuple[str, int] | None,
    debug_socket: str | None,
) -> None:
    """Run the proxy of `node` in `mode` (a registered mode's name, proxy/mode.py) until SIGTERM,
    serving /metrics and health on `http_addr` and its state on `debug_socket` (None:
    not at all). `fallback` (`--mode auto`): an eBPF load failure falls back to iptables;
    `mode_note` says why the mode was chosen (for the logs and the debug dump).
    """
    informers = InformerFactory(store)
    d = Daemon(
        "proxy",
        node,
        store,
        http_addr=http_addr,
        debug_socket=debug_socket,
        configure_logging=True,
    )
    d.add("informers", Informers(informers))
    d.add(
        "proxy",
        Proxy(
            store,
            informers,
            node,
            min_interval=min_sync_period,
            max_interval=sync_period,
            mode_name=mode,
            fallback=fallback,
            mode_note=mode_note,
        ),
    )
    await d.run()
