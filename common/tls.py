"""TLS for corral's HTTPS servers and their clients, one way each.

Servers present a certificate and verify client certificates against a CA; a
client certificate's subject is the caller's identity (CN = user, O = groups), as
Kubernetes' x509 authentication reads it.
"""

from __future__ import annotations

import ssl
from typing import Any


def server_context(
    cert: str, key: str, client_ca: str | None, require_client: bool = False
) -> ssl.SSLContext:
    """Our certificate; client certificates verified against `client_ca` when given
    (optional unless `require_client`, so anonymous requests can get a 401)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verify the server against `ca`; present `cert` when given."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def peer_identity(transport: Any) -> tuple[str, tuple[str, ...]] | None:
    """(CN, O values) of the verified client certificate on `transport`; None without one."""
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    cert = sslobj.getpeercert() if sslobj is not None else None
    if not cert:
        return None
    cn, groups = "", []
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                cn = v
            elif k == "organizationName":
                groups.append(v)
    return cn, tuple(groups)
