"""What every verb of the local cluster shares: its error type, where a cluster's
state is, the root check, and commands run inside a node.

The verbs themselves: `corral up` (cluster/up.py, its input checked first in
cluster/plan.py, its etcd in cluster/etcdsetup.py), `corral down`
(cluster/down.py, with cluster/orphans.py for what the state file lost) and
`corral status` (cluster/health.py).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable

from corral.api.store import TLSFiles
from corral.cluster import nodes, underlay
from corral.cluster import state as st
from corral.cluster.state import ClusterState
from corral.node.procs import start_time

Progress = Callable[[str], None]


class ClusterError(Exception):
    """A user mistake or unmet precondition; the message says what to do."""


def on_stderr(msg: str) -> None:
    """The default Progress: each step's line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def state_dir_for(name: str, state_dir: str | None = None) -> str:
    return os.path.abspath(state_dir) if state_dir else st.default_state_dir(name)


def load_state(name: str, state_dir: str | None = None) -> ClusterState | None:
    s = st.load(state_dir_for(name, state_dir))
    return s if s is not None and s.name == name else None


def local_etcd(
    name: str = st.DEFAULT_NAME, state_dir: str | None = None
) -> tuple[list[str], TLSFiles | None] | None:
    """The etcd endpoints (as the host reaches them) of local cluster `name` and the
    operator's client certificate for them, if the cluster exists."""
    s = load_state(name, state_dir)
    if s is None or not s.etcd_urls:
        return None
    return list(s.etcd_urls), s.tls("cli")


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError(
            "corral needs root to create network namespaces and interfaces; run it with sudo"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_exec_argv(
    name: str, node: str, argv: list[str], state_dir: str | None = None
) -> list[str]:
    """The command line that runs argv inside `node` (its netns and mount namespace)."""
    s = load_state(name, state_dir)
    if s is None:
        raise ClusterError(f"no local cluster named {name!r}; start one with `corral up`")
    n = s.node(node) or s.node(st.node_name(name, int(node)) if node.isdigit() else "")
    if n is None:
        raise ClusterError(
            f"no node {node!r} in cluster {name!r}; nodes are {', '.join(x.name for x in s.nodes)}"
        )
    if n.holder is None or start_time(n.holder.pid) != n.holder.started:
        raise ClusterError(
            f"{n.name} is not running (its holder process is gone); run "
            f"`corral up{'' if name == st.DEFAULT_NAME else ' --name ' + name}` to restart it"
        )
    if not argv:
        raise ClusterError("no command given: corral node-exec NODE -- COMMAND [ARGS...]")
    return nodes.exec_argv(n.holder.pid, argv)


def unused_underlay_cidr(tries: int = 200) -> str:
    """A random 10.200-239.x.0/24 no host address uses: for tests and throwaway clusters."""
    import random

    taken = [n for _, n in underlay.host_networks()]
    for _ in range(tries):
        net = ipaddress.ip_network(f"10.{random.randint(200, 239)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    raise ClusterError("no unused /24 left in 10.200.0.0-10.239.255.255")
