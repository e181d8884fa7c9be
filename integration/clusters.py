"""Whole-cluster fixtures: a real `corral up` cluster shared by the integration tests.

Use the session-scoped `cluster` fixture in `integration/test_*.py`::

    def test_pods_reach_each_other(cluster):
        r = cluster.exec("node-1", "ip", "-o", "addr")          # runs inside node-1
        assert cluster.ips["node-1"] in r.stdout
        cluster.corral("apply", "-f", "web.yaml")               # the real CLI, this cluster
        async with cluster.store() as store: ...                # a connected Store

What it is: `corral up --nodes 3` run as a user runs it, with a cluster name and
an underlay CIDR unique to the test run and its state under a temporary
CORRAL_STATE_DIR, so it never collides with a user's own cluster. It waits (up
to CORRAL_TEST_READY_TIMEOUT seconds, default 120) for every Node to be Ready
and is removed with `corral down` at the end of the session, also when tests
fail or `up` itself failed half-way.

Node names are the keys you use everywhere: `cluster.nodes` is e.g.
["it1a2b3c-node-1", ...] and `cluster.exec` also accepts "node-1" or "1" as a
short form. One cluster serves the whole session: clean up the objects your
test creates (pods, services) so the next test starts from an idle cluster.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from corral.api.store import Store
from corral.cluster import down, local
from corral.cluster.state import ClusterState, load

NODES = 3


@dataclass
class LocalCluster:
    """A running `corral up` cluster, as the integration tests see it."""

    name: str  # cluster name (`corral ... --name NAME`)
    state_dir: str  # <root>/<name>: state.json, logs/, nodes/<node>/
    nodes: list[str]  # node names, in order: node i is nodes[i-1]
    netns: dict[str, str]  # node name -> its network namespace (/run/netns/<ns>)
    ips: dict[str, str]  # node name -> underlay (InternalIP) address
    host_ip: str  # the host's address on the underlay
    underlay_cidr: str
    etcd_urls: list[str]  # etcd as the host (the test process) reaches it
    etcd_node_urls: list[str]  # etcd as a process inside a node reaches it
    env: dict[str, str] = field(default_factory=dict)  # env that points `corral` at it

    @classmethod
    def from_state(cls, state_dir: str, env: dict[str, str]) -> LocalCluster:
        """The cluster whose state is in `state_dir`; `env` points `corral` at it."""
        s = load(state_dir)
        assert s is not None, f"no cluster state in {state_dir}"
        return cls(
            name=s.name,
            state_dir=s.state_dir,
            nodes=[n.name for n in s.nodes],
            netns={n.name: n.netns for n in s.nodes},
            ips={n.name: n.ip for n in s.nodes},
            host_ip=s.host_ip,
            underlay_cidr=s.underlay_cidr,
            etcd_urls=list(s.etcd_urls),
            etcd_node_urls=list(s.etcd_node_urls),
            env=env,
        )

    def up_again(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """`corral up` on this running cluster, as an operator repairs one: it restarts
        what is missing (a killed daemon, etcd) and waits for every node to be Ready."""
        return self.corral(
            "up", "--name", self.name, "--nodes", str(len(self.nodes)),
            "--underlay-cidr", self.underlay_cidr, "--wait", "120", timeout=timeout,
        )  # fmt: skip

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    def node(self, node: str) -> str:
        """The full node name for "node-2", "2" or the full name itself."""
        if node in self.netns:
            return node
        short = node.removeprefix("node-")
        if short.isdigit() and 1 <= int(short) <= len(self.nodes):
            return self.nodes[int(short) - 1]
        raise KeyError(f"no node {node!r}; nodes are {', '.join(self.nodes)}")

    def exec_argv(self, node: str, *cmd: str) -> list[str]:
        """argv that runs `cmd` inside the node (for subprocess.Popen of long-lived things)."""
        return local.node_exec_argv(self.name, self.node(node), list(cmd), self.state_dir)

    def exec(
        self,
        node: str,
        *cmd: str,
        check: bool = False,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` inside the node's network and mount namespaces; text output captured."""
        return subprocess.run(
            self.exec_argv(node, *cmd),
            check=check,
            timeout=timeout,
            capture_output=True,
            text=True,
            input=input,
        )

    def corral(
        self, *args: str, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run the real `corral` CLI against this cluster (finds its etcd through the env)."""
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def store(self) -> Store:
        """A Store on the cluster's etcd: `async with cluster.store() as store:`."""
        return Store(self.etcd_urls, tls=self.state().tls("cli"))

    def state(self) -> ClusterState:
        s = load(self.state_dir)
        assert s is not None, f"the state of cluster {self.name} is gone"
        return s

    def log(self, daemon: str, node: str) -> str:
        """The text of a daemon's log on a node, e.g. log("node", "node-1"), for messages."""
        path = os.path.join(self.logs_dir, f"{daemon}-{self.node(node)}.log")
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@contextlib.contextmanager
def local_cluster(nodes: int = NODES, *up_args: str) -> Iterator[LocalCluster]:
    """A `corral up --nodes N UP_ARGS...` cluster of its own, removed on exit (also on
    failure). The session's `cluster` is one; modules that need another shape (e.g.
    `--etcd-members 3`) open their own with a module-scoped fixture."""
    if os.geteuid() != 0:
        pytest.skip("whole-cluster tests need root")
    root = tempfile.mkdtemp(prefix="corral-it-")
    name = "it" + secrets.token_hex(3)
    env = dict(os.environ, CORRAL_STATE_DIR=root, CORRAL_CLUSTER=name)
    env.pop("CORRAL_ETCD", None)
    wait = os.environ.get("CORRAL_TEST_READY_TIMEOUT", "120")

    def corral(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )

    try:
        r = corral(
            "up",
            "--name",
            name,
            "--nodes",
            str(nodes),
            "--underlay-cidr",
            local.unused_underlay_cidr(),
            "--wait",
            wait,
            *up_args,
        )
        if r.returncode != 0:
            pytest.fail(f"corral up failed:\n{r.stderr}{r.stdout}", pytrace=False)
        yield LocalCluster.from_state(os.path.join(root, name), env)
    finally:  # in-process: works even if the CLI is broken
        down.down(name, os.path.join(root, name), progress=lambda _: None)
        shutil.rmtree(root, ignore_errors=True)
