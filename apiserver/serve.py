"""`corral apiserver`'s daemon: the API server (apiserver/server.py) on the skeleton.

`corral apiserver` parses kube-apiserver's flags into `serve`'s arguments; tests
await `serve` (or build `APIServer` themselves) in-process.
"""

from __future__ import annotations

import ipaddress
import os

from corral.api.store import Store
from corral.apiserver.kubernetes_service import KubernetesService
from corral.apiserver.nodeproxy import NodeProxy
from corral.apiserver.rest import Storage
from corral.apiserver.server import APIServer, tls_context
from corral.apiserver.watchcache import CAPACITY
from corral.daemon.core import Daemon


def build(
    store: Store,
    *,
    bind_address: str,
    secure_port: int,
    tls_cert_file: str,
    tls_private_key_file: str,
    client_ca_file: str | None,
    kubelet_tls: tuple[str, str, str] | None = None,
    bookmark_interval: float = 60.0,
    watch_cache_capacity: int = CAPACITY,
) -> APIServer:
    """The API server component (not started): HTTPS with client-certificate
    authentication when `client_ca_file` is given; pods' log and exec relayed to their
    nodes with `kubelet_tls` (CA, client certificate, key)."""
    ctx = tls_context(tls_cert_file, tls_private_key_file, client_ca_file)
    return APIServer(
        Storage(store, watch_cache_capacity),
        bind_address,
        secure_port,
        ctx,
        bookmark_interval=bookmark_interval,
        nodes=NodeProxy(store, *kubelet_tls) if kubelet_tls else None,
    )


async def serve(
    store: Store,
    *,
    bind_address: str,
    secure_port: int,
    tls_cert_file: str,
    tls_private_key_file: str,
    client_ca_file: str | None,
    http_addr: tuple[str, int] | None,
    kubelet_tls: tuple[str, str, str] | None = None,
    debug_socket: str | None,
    node: str | None = None,
    advertise_address: str | None = None,
    endpoint_reconciler: str = "lease",
) -> None:
    """Serve the Kubernetes API on https://`bind_address`:`secure_port` until SIGTERM;
    /healthz, /readyz and /livez on that port report the skeleton's checks (etcd
    answering, the server started), and /metrics lives on `http_addr`. With the `lease`
    endpoint reconciler the server keeps the `kubernetes` Service and puts
    `advertise_address` (default: `bind_address` unless that is a wildcard) into its
    endpoints (apiserver/kubernetes_service.py)."""
    api = build(
        store,
        bind_address=bind_address,
        secure_port=secure_port,
        tls_cert_file=tls_cert_file,
        tls_private_key_file=tls_private_key_file,
        client_ca_file=client_ca_file,
        kubelet_tls=kubelet_tls,
    )
    d = Daemon(
        "apiserver",
        node or os.environ.get("CORRAL_NODE") or os.uname().nodename,
        store,
        http_addr=http_addr,
        debug_socket=debug_socket,
        configure_logging=True,
    )
    api.health, api.readiness = d.health, d.readiness
    d.add("apiserver", api)
    advertise = advertise_address or (
        None if ipaddress.ip_address(bind_address).is_unspecified else bind_address
    )
    if endpoint_reconciler == "lease" and advertise:
        d.add("kubernetes-service", KubernetesService(store, advertise, api.port))
    await d.run()
