"""The local cluster's API server credentials: its serving certificate, an admin client
certificate (O=system:masters, as kubeadm's and kind's) and `<state>/kubeconfig`, which
embeds them, so the file alone is enough for kubectl (`corral kubeconfig` prints it)."""

from __future__ import annotations

import base64
import os

import yaml

from corral.cluster import pki
from corral.cluster.state import ClusterState
from corral.common.files import write_atomic

PORT = 6443
ADMIN = "apiserver-admin"  # the admin certificate's file name in <state>/pki
SERVER = "apiserver"
# The names in-cluster clients use (the `kubernetes` Service comes later).
DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


def path(s: ClusterState) -> str:
    return os.path.join(s.state_dir, "kubeconfig")


def server_url(s: ClusterState) -> str:
    return f"https://{s.nodes[0].ip}:{PORT}"


def ensure(s: ClusterState) -> str:
    """The API server's certificate (for node-1's address and loopback), the admin's,
    and the kubeconfig; made when missing or when node-1's address changed."""
    paths = pki.ensure_ca(s.pki_dir)  # an external etcd without TLS made no CA yet
    ips = ["127.0.0.1", s.nodes[0].ip]
    if pki.cert_ips(paths, SERVER) != set(ips):
        pki.issue_server(s.pki_dir, SERVER, "kube-apiserver", ips, DNS_NAMES)
    if not os.path.exists(paths.key(ADMIN)):
        pki.issue_client(s.pki_dir, ADMIN, "kubernetes-admin", ("system:masters",))
    write_atomic(path(s), render(s).encode(), 0o600)
    return path(s)


def _b64(file: str) -> str:
    with open(file, "rb") as f:
        return base64.b64encode(f.read()).decode()


def render(s: ClusterState) -> str:
    paths = pki.Paths(s.pki_dir)
    name = f"corral-{s.name}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [
            {
                "name": name,
                "cluster": {
                    "server": server_url(s),
                    "certificate-authority-data": _b64(paths.ca),
                },
            }
        ],
        "users": [
            {
                "name": name,
                "user": {
                    "client-certificate-data": _b64(paths.cert(ADMIN)),
                    "client-key-data": _b64(paths.key(ADMIN)),
                },
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    return yaml.safe_dump(doc, sort_keys=False)
