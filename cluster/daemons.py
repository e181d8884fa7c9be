"""The daemons `corral up` starts: one table, so a new capability joins by adding a row.

Each row is a `corral` subcommand, run as `corral --etcd URLS <args>` with the
etcd URLs as seen from inside the node. `{node}`, `{cluster}`, `{node_ip}` (the
node's underlay address), `{pki}` (the cluster's certificates), `{node_state}` (a
per-node directory that survives restarts) and `{pod_credentials}` (credential sets
for system pods) are filled in. A row with a `port` serves `/metrics`, `/healthz`
and `/readyz` there, on its node's address (`--metrics-addr {node_ip}:PORT`), and
`corral status` asks its `/healthz`. A row whose `module` is not importable yet is
skipped, so the table can name daemons that are still being written.

NODE_DAEMONS run once per node, inside the node (its network and mount
namespaces); CLUSTER_DAEMONS run once, on node-1 (like a control-plane node).
Logs go to <state>/logs/<daemon>-<node>.log.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

from corral.cluster import nodes
from corral.cluster.state import ClusterState, NodeState
from corral.daemon.options import PORTS
from corral.node.procs import ProcRecord, spawn


@dataclass(frozen=True)
class Daemon:
    name: str
    args: tuple[str, ...]
    module: str  # importable once the subcommand exists
    port: int | None = None  # its /healthz and /metrics port on the node's address
    role: str = "node"  # whose etcd client certificate it uses (cluster/pki.py)

    def argv(self, values: dict[str, str]) -> list[str]:
        args = [a.format(**values) for a in self.args]
        if self.port is not None:
            args += ["--metrics-addr", f"{values['node_ip']}:{self.port}"]
        return args

    def url(self, node_ip: str, path: str = "/healthz") -> str | None:
        return None if self.port is None else f"http://{node_ip}:{self.port}{path}"

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False


NODE_DAEMONS: list[Daemon] = [
    Daemon(
        "node",
        (
            "node",
            "--name",
            "{node}",
            "--state-dir",
            "{node_state}",
            "--underlay-iface",
            "eth0",
            "--pod-credentials-dir",
            "{pod_credentials}",
            # the node API for the API server's logs and exec (cluster/kubeconfig.py)
            "--tls-cert-file",
            "{pki}/node-api-{node}.crt",
            "--tls-private-key-file",
            "{pki}/node-api-{node}.key",
            "--client-ca-file",
            "{pki}/ca.crt",
        ),
        "corral.cli.cmd_node",
        PORTS["node"],
    ),
    # mode: --mode's default comes from CORRAL_PROXY_MODE (`corral up --proxy-mode`)
    Daemon("proxy", ("proxy", "--node", "{node}"), "corral.cli.cmd_proxy", PORTS["proxy"]),
]
CLUSTER_DAEMONS: list[Daemon] = [
    # first: the API server on node-1's address, with the certificates cluster/kubeconfig.py
    # made (the `control` etcd identity: it reads and writes every kind)
    Daemon(
        "apiserver",
        (
            "apiserver",
            "--bind-address",
            "{node_ip}",
            "--secure-port",
            "6443",
            "--tls-cert-file",
            "{pki}/apiserver.crt",
            "--tls-private-key-file",
            "{pki}/apiserver.key",
            "--client-ca-file",
            "{pki}/ca.crt",
            "--kubelet-client-certificate",
            "{pki}/apiserver-kubelet-client.crt",
            "--kubelet-client-key",
            "{pki}/apiserver-kubelet-client.key",
            "--kubelet-certificate-authority",
            "{pki}/ca.crt",
        ),
        "corral.cli.cmd_apiserver",
        PORTS["apiserver"],
        "control",
    ),
    Daemon("scheduler", ("scheduler",), "corral.cli.cmd_control", PORTS["scheduler"], "control"),
    Daemon(
        "controllers", ("controllers",), "corral.cli.cmd_control", PORTS["controllers"], "control"
    ),
]


def by_name(name: str) -> Daemon | None:
    return next((d for d in NODE_DAEMONS + CLUSTER_DAEMONS if d.name == name), None)


def wanted(state: ClusterState) -> list[tuple[Daemon, NodeState]]:
    """Every (daemon, node) pair that should be running, the API servers first (one on
    each of nodes 1..`state.apiservers`), the other cluster daemons on node-1."""
    out = [(d, n) for n in state.nodes for d in NODE_DAEMONS if d.available()]
    if state.nodes:
        api = [d for d in CLUSTER_DAEMONS if d.name == "apiserver" and d.available()]
        servers = [(d, n) for d in api for n in state.nodes[: max(1, state.apiservers)]]
        rest = [
            (d, state.nodes[0]) for d in CLUSTER_DAEMONS if d.name != "apiserver" and d.available()
        ]
        out = servers + out + rest
    return out


def role(d: Daemon) -> str:
    return f"daemon:{d.name}"


def start(state: ClusterState, d: Daemon, node: NodeState) -> ProcRecord:
    if node.holder is None:
        raise RuntimeError(f"{node.name} has no holder process to start {d.name} in")
    node_state = os.path.join(state.node_dir(node.name), "state")
    os.makedirs(node_state, exist_ok=True)
    values = {
        "node": node.name,
        "cluster": state.name,
        "node_state": node_state,
        "node_ip": node.ip,
        "pod_credentials": state.pod_credentials_dir,
        "pki": state.pki_dir,
    }
    argv = [
        sys.executable,
        "-m",
        "corral",
        "--etcd",
        ",".join(state.etcd_node_urls),
        *tls_args(state, d.role),
        *d.argv(values),
    ]
    os.makedirs(state.logs_dir, exist_ok=True)
    log = os.path.join(state.logs_dir, f"{d.name}-{node.name}.log")
    env = dict(os.environ, CORRAL_CLUSTER=state.name, CORRAL_NODE=node.name, PYTHONUNBUFFERED="1")
    env.pop("CORRAL_ETCD", None)
    proc = spawn(nodes.exec_argv(node.holder.pid, argv, cwd="/"), log, env)
    return ProcRecord.of(proc.pid, role(d), node=node.name, log=log)


def tls_args(state: ClusterState, role: str) -> list[str]:
    """The global flags that give a daemon its etcd client certificate."""
    tls = state.tls(role)
    if tls is None:
        return []
    return ["--etcd-cafile", tls.ca, "--etcd-certfile", tls.cert, "--etcd-keyfile", tls.key]


def find(state: ClusterState, d: Daemon, node: NodeState) -> ProcRecord | None:
    return next((r for r in state.daemons if r.role == role(d) and r.node == node.name), None)
