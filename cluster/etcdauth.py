"""etcd's own access control on the local etcd (`corral up --etcd-auth`): the `dns`
certificate may only read.

With `--client-cert-auth` and auth enabled, etcd takes a client certificate's CN as
the user name (no password, no token). Each role of cluster/pki.py becomes a user:
`node`, `control` and `cli` get etcd's `root` role (they create, update and delete
everywhere), `dns` gets `dns-reader`, read-only on `/corral/`. Measured here on
etcd 3.4.23: the DNS server's reads, lists and watches work unchanged, its writes
answer "permission denied"; but every request then passes the auth store, and
50-in-flight puts cost etcd ~25 % more CPU (0.81 of the throughput). So it is
opt-in (docs/cluster.md, "Cluster DNS").

Idempotent: users, roles and grants that exist already are kept; done through the
`cli` certificate with Debian's `etcdctl` (etcd-client).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

from corral.api.store import TLSFiles
from corral.cluster import pki

READER = "dns-reader"
READ_ONLY = {"dns": READER}  # role certificate -> its etcd role; all others get root
PREFIX = "/corral/"
_TOLERATED = ("already exists", "already granted", "already been granted")


class EtcdAuthError(RuntimeError):
    pass


def _etcdctl(url: str, tls: TLSFiles, *args: str) -> str:
    if shutil.which("etcdctl") is None:
        raise EtcdAuthError("etcdctl is not installed (Debian package etcd-client); run `make up`")
    argv = [
        "etcdctl", "--endpoints", url, "--cacert", tls.ca, "--cert", tls.cert, "--key", tls.key,
        "--dial-timeout", "5s", "--command-timeout", "10s", *args,
    ]  # fmt: skip
    env = dict(os.environ, ETCDCTL_API="3")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)
    out = (p.stdout + p.stderr).strip()
    if p.returncode != 0 and not any(t in out for t in _TOLERATED):
        raise EtcdAuthError(
            f"etcdctl {' '.join(args[:2])}: {out.splitlines()[-1] if out else p.returncode}"
        )
    return out


def enable(url: str, tls: TLSFiles) -> None:
    """Users for every role, `dns` read-only, then auth on (a no-op when it is on)."""

    def run(*a: str) -> str:
        return _etcdctl(url, tls, *a)

    run("role", "add", READER)
    run("role", "grant-permission", READER, "read", PREFIX, "--prefix=true")
    for user in ("root", *pki.ROLES):
        # Passwords are never used (the certificate's CN is the user); etcd 3.4 wants one.
        run("user", "add", f"{user}:{secrets.token_urlsafe(24)}", "--interactive=false")
        run("user", "grant-role", user, READ_ONLY.get(user, "root"))
    run("auth", "enable")
