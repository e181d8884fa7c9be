"""`corral dns`'s daemon: the DNS server (clusterdns/server.py) on the skeleton, with
its own informers. `corral dns` calls `serve` once its capabilities are dropped;
in `corral up` it runs in the cluster DNS pods (cluster/dnsworkload.py)."""

from __future__ import annotations

from corral.api.informer import InformerFactory
from corral.api.store import Store
from corral.clusterdns.server import Config, DNSServer
from corral.daemon.core import Daemon, Informers
from corral.daemon.heap import HeapTuning


async def serve(
    store: Store,
    node: str,
    config: Config,
    *,
    http_addr: tuple[str, int] | None,
    debug_socket: str | None,
) -> None:
    """Answer as `config` says until SIGTERM, serving /metrics and health on
    `http_addr` and its state on `debug_socket` (None: not at all)."""
    informers = InformerFactory(store)
    d = Daemon(
        "dns", node, store, http_addr=http_addr, debug_socket=debug_socket, configure_logging=True
    )
    d.add("informers", Informers(informers))
    d.add("dns", DNSServer(store, informers, config))
    d.add("heap", HeapTuning(informers))  # the caches out of the cycle collector; heap trimmed
    await d.run()
