"""The local cluster's certificates: one CA, etcd's server/peer certificate, one client
certificate per role.

`corral up` makes them once in `<state>/pki` (0700, keys 0600) and keeps them
across restarts; etcd then runs with `--client-cert-auth` and
`--peer-client-cert-auth`, so only a holder of a certificate this CA signed can
talk to it. Roles (the certificate's CN, which is also etcd's user name if
etcd auth is turned on later):

    node     every node's daemons (corral node, proxy)
    control  the scheduler and the controllers
    cli      the `corral` command run by the operator on the host
    dns      the cluster DNS pods (`corral dns`), which only read; the node runtime
             mounts it into them alone (cluster/dnsworkload.py)

Keys are ECDSA P-256; the CA lives 10 years, leaf certificates 2.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from corral.common.files import write_atomic

ROLES = ("node", "control", "cli", "dns")
CA_NAME = "corral local cluster CA"


@dataclass(frozen=True)
class Paths:
    dir: str

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    def cert(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.crt")

    def key(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.key")


def _new_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load(paths: Paths, name: str):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(paths.cert(name), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(paths.key(name), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    return cert, key


def _issue(
    paths: Paths,
    name: str,
    cn: str,
    ca,  # type: ignore[no-untyped-def]
    ca_key,  # type: ignore[no-untyped-def]
    *,
    is_ca: bool = False,
    server: bool = False,
    client: bool = False,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    days: int = 730,
    orgs: tuple[str, ...] = (),
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _new_key()
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
        + [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if is_ca else ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
    )
    if is_ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        b = b.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), True
        )
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        b = b.add_extension(x509.ExtendedKeyUsage(usages), False)
    sans = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] + [x509.DNSName(d) for d in dns]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), False)
    from cryptography.hazmat.primitives import serialization

    cert = b.sign(key if is_ca else ca_key, hashes.SHA256())
    write_atomic(paths.key(name), _key_pem(key), 0o600)
    write_atomic(paths.cert(name), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def cert_ips(paths: Paths, name: str = "etcd") -> set[str]:
    """The IP addresses certificate `name` is valid for (empty when it is missing)."""
    from cryptography import x509

    try:
        cert, _ = _load(paths, name)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def ensure_ca(dir: str) -> Paths:
    """The cluster CA in `dir`, made when missing; a new CA removes every certificate
    the old one signed (useless now), so the callers issue them again."""
    paths = Paths(dir)
    os.makedirs(dir, mode=0o700, exist_ok=True)
    os.chmod(dir, 0o700)
    if not (os.path.exists(paths.cert("ca")) and os.path.exists(paths.key("ca"))):
        _issue(paths, "ca", CA_NAME, None, None, is_ca=True, days=3650)
        for f in os.listdir(dir):
            if f.endswith((".crt", ".key")) and f not in ("ca.crt", "ca.key"):
                os.unlink(os.path.join(dir, f))
    return paths


def ensure(dir: str, server_ips: list[str]) -> Paths:
    """The CA, etcd's certificate (valid for `server_ips` and loopback) and a client
    certificate per role; made when missing, kept when present (re-issued for etcd only
    when its addresses changed)."""
    paths = ensure_ca(dir)
    ca, ca_key = _load(paths, "ca")
    ips = tuple(sorted({"127.0.0.1", *server_ips}))
    if not os.path.exists(paths.key("etcd")) or cert_ips(paths) != set(ips):
        _issue(
            paths, "etcd", "etcd", ca, ca_key, server=True, client=True, ips=ips, dns=("localhost",)
        )
    for role in ROLES:
        if not (os.path.exists(paths.cert(role)) and os.path.exists(paths.key(role))):
            _issue(paths, role, role, ca, ca_key, client=True)
    return paths


def issue_client(dir: str, name: str, cn: str, orgs: tuple[str, ...] = ()) -> Paths:
    """Another client certificate from the same CA (tests use one for a stranger; the
    API server's admin is CN=admin, O=system:masters, as kubeadm's)."""
    paths = Paths(dir)
    ca, ca_key = _load(paths, "ca")
    _issue(paths, name, cn, ca, ca_key, client=True, orgs=orgs)
    return paths


def issue_server(dir: str, name: str, cn: str, ips: list[str], dns: tuple[str, ...] = ()) -> Paths:
    """A serving certificate from the same CA for `ips` and `dns` (the API server's)."""
    paths = Paths(dir)
    ca, ca_key = _load(paths, "ca")
    _issue(paths, name, cn, ca, ca_key, server=True, ips=tuple(sorted(set(ips))), dns=dns)
    return paths
