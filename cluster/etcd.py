"""Run a local etcd (Debian's etcd-server) for `corral up` and for tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from corral.api.store import TLSFiles
from corral.cluster.pki import Paths
from corral.node.procs import ProcRecord, spawn, stop

ETCD_BINARY = "etcd"


class EtcdError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health(url: str, tls: TLSFiles | None = None, timeout: float = 1.0) -> tuple[bool, str]:
    """(healthy, why not) from etcd's /health at `url`, with a client certificate for TLS."""
    try:
        ctx = tls.ssl_context() if tls is not None else None
        with urllib.request.urlopen(f"{url}/health", timeout=timeout, context=ctx) as r:
            body = r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        return False, str(getattr(e, "reason", e))
    if b'"true"' in body:
        return True, ""
    return False, body.decode(errors="replace").strip()


@dataclass
class LocalEtcd:
    """One etcd member with its data under `data_dir`.

    `listen_hosts` are the addresses it serves clients on: loopback for the
    host, plus the host's underlay address so node namespaces reach it.
    """

    data_dir: str
    client_port: int = 0
    peer_port: int = 0
    listen_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    name: str = "corral"
    log_path: str | None = None
    record: ProcRecord | None = None
    # Mutual TLS for clients and peers: a pki.Paths whose "etcd" certificate is etcd's own.
    pki: Paths | None = None
    # Every member's name -> peer URL, for a member of a multi-member cluster (None: alone).
    initial_cluster: dict[str, str] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.pki is not None else "http"

    @property
    def client_urls(self) -> list[str]:
        return [f"{self.scheme}://{h}:{self.client_port}" for h in self.listen_hosts]

    def client_tls(self, role: str = "cli") -> TLSFiles | None:
        """The TLS files a client of `role` connects with (None without TLS)."""
        if self.pki is None:
            return None
        return TLSFiles(self.pki.ca, self.pki.cert(role), self.pki.key(role))

    def _tls_args(self) -> list[str]:
        if self.pki is None:
            return []
        cert, key, ca = self.pki.cert("etcd"), self.pki.key("etcd"), self.pki.ca
        return [
            "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
            "--client-cert-auth",
            "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
            "--peer-client-cert-auth",
        ]  # fmt: skip

    @property
    def url(self) -> str:
        return self.client_urls[0]

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.peer_port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start this member and wait until it is healthy (a lone member, or a quorum)."""
        proc = self.launch()
        self.wait_healthy(timeout, proc)

    def launch(self) -> subprocess.Popen:
        """Start the process without waiting: members of one cluster start together."""
        if shutil.which(ETCD_BINARY) is None:
            raise EtcdError("etcd is not installed (Debian package etcd-server); run `make up`")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        if not self.client_port:
            self.client_port = free_port()
        if not self.peer_port:
            self.peer_port = free_port()
        peer = self.peer_url
        cluster = self.initial_cluster or {self.name: peer}
        # A member of several needs more slack than a lone one: a loaded 2-core machine
        # must not lose its leader to a scheduling hiccup.
        heartbeat, election = ("10", "100") if len(cluster) == 1 else ("50", "1000")
        args = [
            ETCD_BINARY,
            "--name",
            self.name,
            "--data-dir",
            self.data_dir,
            "--listen-client-urls",
            ",".join(self.client_urls),
            "--advertise-client-urls",
            ",".join(self.client_urls),
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            ",".join(f"{n}={u}" for n, u in cluster.items()),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            next(iter(cluster)),
            "--heartbeat-interval",
            heartbeat,
            "--election-timeout",
            election,
            "--log-level",
            "warn",
            *self._tls_args(),
        ]
        self.log_path = self.log_path or os.path.join(self.data_dir, "..", f"{self.name}-etcd.log")
        proc = spawn(args, self.log_path)
        self.record = ProcRecord.of(proc.pid, "etcd", log=self.log_path)
        return proc

    def wait_healthy(self, timeout: float, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        tls = self.client_tls()
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise EtcdError(f"etcd exited with {proc.returncode}; see {self.log_path}")
            ok, last = health(self.url, tls)
            if ok:
                return
            time.sleep(0.05)
        raise EtcdError(f"etcd at {self.url} not healthy after {timeout:.0f}s ({last})")

    def stop(self) -> None:
        if self.record is not None:
            stop(self.record)
            self.record = None
