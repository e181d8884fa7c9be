"""The local cluster's API server credentials: its serving certificate, an admin client
certificate (O=system:masters, as kubeadm's and kind's) and `<state>/kubeconfig`, which
embeds them, so the file alone is enough for kubectl (`corral kubeconfig` prints it).
`merge`/`unmerge` put the same context into the user's kubeconfig and take it out again,
as kind does, so plain `kubectl` talks to the cluster after `corral up`."""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import yaml

from corral.api.netconfig import kubernetes_service_ip
from corral.api.objects import NetworkSpec
from corral.cluster import pki
from corral.cluster.state import ClusterState
from corral.common.files import write_atomic

PORT = 6443
ADMIN = "apiserver-admin"  # the admin certificate's file name in <state>/pki
SERVER = "apiserver"
# The API server's client certificate for the nodes' API (logs, exec), as kubeadm's
# apiserver-kubelet-client; each node's serving certificate is node-api-<node>.
KUBELET_CLIENT = "apiserver-kubelet-client"


def node_api_cert(node: str) -> str:
    return f"node-api-{node}"


# The names in-cluster clients use (the `kubernetes` Service).
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
    # and the `kubernetes` Service's address (the default service CIDR's first), which
    # in-cluster clients dial
    servers = [n.ip for n in s.nodes[: max(1, s.apiservers)]]
    ips = ["127.0.0.1", *servers, kubernetes_service_ip(NetworkSpec().service_cidr)]
    if pki.cert_ips(paths, SERVER) != set(ips):
        pki.issue_server(s.pki_dir, SERVER, "kube-apiserver", ips, DNS_NAMES)
    if not os.path.exists(paths.key(ADMIN)):
        pki.issue_client(s.pki_dir, ADMIN, "kubernetes-admin", ("system:masters",))
    if not os.path.exists(paths.key(KUBELET_CLIENT)):
        pki.issue_client(
            s.pki_dir, KUBELET_CLIENT, "kube-apiserver-kubelet-client", ("system:masters",)
        )
    for n in s.nodes:
        name = node_api_cert(n.name)
        if pki.cert_ips(paths, name) != {n.ip}:
            pki.issue_server(s.pki_dir, name, f"system:node:{n.name}", [n.ip], (n.name,))
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


# ------------------------------------------------------------ the user's kubeconfig

LOCK_WAIT = 10.0  # seconds; kubectl holds its lock only while it writes


def user_path() -> str:
    """Where kubectl reads and kind writes: the first path of $KUBECONFIG, else
    ~/.kube/config."""
    for p in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if p:
            return os.path.expanduser(p)
    return os.path.expanduser(os.path.join("~", ".kube", "config"))


@contextlib.contextmanager
def _locked(target: str) -> Iterator[None]:
    """client-go's lock: `<file>.lock` created exclusively, removed afterwards (so
    kubectl and corral never interleave their rewrites of the same file)."""
    lock = target + ".lock"
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                busy = f"{lock} exists (another kubectl or corral is writing {target})"
                raise OSError(busy) from None
            time.sleep(0.05)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)


def _load(target: str) -> dict[str, Any]:
    try:
        with open(target) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        return {}
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{target} is not a kubeconfig (not a mapping)")
    for section in ("clusters", "users", "contexts"):
        if not isinstance(doc.get(section) or [], list):
            raise ValueError(f"{target}: {section} is not a list")
    return doc


def _without(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for section in ("clusters", "users", "contexts"):
        if section in doc:
            doc[section] = [e for e in doc[section] or [] if (e or {}).get("name") != name]
    return doc


def merge(config: str, target: str | None = None) -> str:
    """Put the cluster's context, cluster and user (`corral-<name>`, from `config` as
    `render` made it) into the user's kubeconfig and make it current, as `kind create
    cluster` does; other entries stay as they are. The file (and its folder) is made
    when missing; written atomically, 0600. Returns its path."""
    target = target or user_path()
    mine = yaml.safe_load(config)
    name = mine["current-context"]
    os.makedirs(os.path.dirname(target) or ".", mode=0o700, exist_ok=True)
    with _locked(target):
        doc = _without(_load(target), name)
        doc.setdefault("apiVersion", "v1")
        doc.setdefault("kind", "Config")
        doc.setdefault("preferences", {})
        for section in ("clusters", "users", "contexts"):
            doc[section] = [*(doc.get(section) or []), *mine[section]]
        doc["current-context"] = name
        write_atomic(target, yaml.safe_dump(doc, sort_keys=False).encode(), 0o600)
    return target


def unmerge(cluster: str, target: str | None = None) -> bool:
    """Remove exactly the entries `merge` added (and the current context when it was
    this cluster's), as `kind delete cluster` does. True if there were any."""
    target = target or user_path()
    name = f"corral-{cluster}"
    if not os.path.exists(target):
        return False
    with _locked(target):
        doc = _load(target)
        before = sum(len(doc.get(k) or []) for k in ("clusters", "users", "contexts"))
        doc = _without(doc, name)
        after = sum(len(doc.get(k) or []) for k in ("clusters", "users", "contexts"))
        current = doc.get("current-context") == name
        if current:
            doc["current-context"] = ""
        if before == after and not current:
            return False
        write_atomic(target, yaml.safe_dump(doc, sort_keys=False).encode(), 0o600)
    return True
