"""A simulated node: its directories, its holder process, commands run inside it, its Node.

The holder is a `sleep` in the node's network namespace and in a mount namespace
of its own, where the node's paths (/run/corral, /etc/cni/net.d, ...) are bind
mounts of `<state>/nodes/<node>/...`. Everything corral runs "on" a node enters
the holder's namespaces (`nsenter -t <holder> -m -n`), so it sees exactly what it
would see on a real machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Sequence

from corral.api.objects import Node, NodeAddress, NodeCondition, NodeStatus, ObjectMeta
from corral.api.store import AlreadyExists, Store, now_iso
from corral.cluster.state import ClusterState, NodeState
from corral.common.labels import HOSTNAME_LABEL
from corral.node import netns
from corral.node.procs import ProcRecord, spawn, start_time

# node path -> directory under <state>/nodes/<node>/
NODE_MOUNTS: list[tuple[str, str]] = [
    ("/run/corral", "run"),
    ("/etc/cni/net.d", "cni-conf"),
    ("/opt/cni/bin", "cni-bin"),
    ("/var/lib/cni", "cni-cache"),
    ("/run/netns", "netns"),
]
REFERENCE_PLUGINS_DIR = "/usr/lib/cni"
REFERENCE_PLUGINS = ["bridge", "host-local", "loopback", "portmap"]
CLUSTER_LABEL = "corral.dev/cluster"

# Mount each (source, target) pair given as arguments, then become the holder.
_HOLDER_SCRIPT = """set -e
while [ $# -gt 0 ]; do mkdir -p "$2"; mount --bind "$1" "$2"; shift 2; done
exec sleep infinity
"""


def prepare_dirs(state: ClusterState, node: NodeState) -> None:
    """The node's directories, with the reference CNI plugins in its /opt/cni/bin."""
    base = state.node_dir(node.name)
    for _, sub in NODE_MOUNTS:
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    bin_dir = os.path.join(base, "cni-bin")
    for plugin in REFERENCE_PLUGINS:
        src, dst = os.path.join(REFERENCE_PLUGINS_DIR, plugin), os.path.join(bin_dir, plugin)
        if os.path.exists(src) and not os.path.exists(dst):
            shutil.copy2(src, dst)


def start_holder(state: ClusterState, node: NodeState, timeout: float = 20.0) -> ProcRecord:
    """Start the node's holder; returns once its bind mounts are in place."""
    base = state.node_dir(node.name)
    pairs: list[str] = []
    for target, sub in NODE_MOUNTS:
        pairs += [os.path.join(base, sub), target]
    os.makedirs(state.logs_dir, exist_ok=True)
    log = os.path.join(state.logs_dir, f"holder-{node.name}.log")
    argv = [
        "nsenter",
        f"--net={netns.path(node.netns)}",
        "--",
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "--",
        "sh",
        "-c",
        _HOLDER_SCRIPT,
        "corral-holder",
        *pairs,
    ]
    proc = spawn(argv, log)
    rec = ProcRecord.of(proc.pid, "holder", node=node.name, log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"holder for {node.name} exited with {proc.returncode}; see {log}")
        if _comm(proc.pid) == "sleep":
            return rec
        time.sleep(0.02)
    raise RuntimeError(f"holder for {node.name} did not become ready in {timeout:.0f}s; see {log}")


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def mount_ns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def exec_argv(holder_pid: int, argv: Sequence[str], cwd: str | None = None) -> list[str]:
    """argv prefixed so it runs in the node (its network and mount namespaces)."""
    wd = cwd if cwd is not None else _safe_cwd()
    return ["nsenter", "-t", str(holder_pid), "-m", "-n", f"--wd={wd}", "--", *argv]


def _safe_cwd() -> str:
    """The caller's directory, unless it lies where the node sees its own mounts."""
    try:
        cwd = os.getcwd()
    except OSError:
        return "/"
    if any(cwd == m or cwd.startswith(m + "/") for m, _ in NODE_MOUNTS):
        return "/"
    return cwd


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def holder_in_netns(holder: ProcRecord, netns_name: str) -> bool:
    """Is the (live) holder in the namespace the netns file names now?"""
    want = _ns_id(netns.path(netns_name))
    return want is not None and _ns_id(f"/proc/{holder.pid}/ns/net") == want


def pids_in_node(
    netns_name: str, mnt_ns: int | None, holder: ProcRecord | None = None
) -> list[int]:
    """Every process in the node's network namespace or in its (live) mount namespace.

    The network namespace is the one its file names, plus the live holder's
    when that differs (the file was removed and made again). A namespace is
    pinned by its file or by a live process, so its inode cannot be reused while
    we look; a mount namespace inode is only trusted while a process in the
    node's network namespace is still in it.
    """
    nets = {_ns_id(netns.path(netns_name))}
    if holder is not None and holder.alive():
        nets.add(_ns_id(f"/proc/{holder.pid}/ns/net"))
    nets.discard(None)
    in_net: list[int] = []
    mnt_of: dict[int, int] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        if _ns_id(f"/proc/{pid}/ns/net") in nets:
            in_net.append(pid)
        m = _ns_id(f"/proc/{pid}/ns/mnt")
        if m is not None:
            mnt_of[pid] = m[1]
    live_mnt = {mnt_of.get(p) for p in in_net} - {None}
    if mnt_ns is not None and mnt_ns in live_mnt:
        in_mnt = [p for p, m in mnt_of.items() if m == mnt_ns]
    else:
        in_mnt = []
    return sorted(set(in_net) | set(in_mnt))


def kill_pids(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is left; each PID checked against its start time."""
    recs = [(p, start_time(p)) for p in pids]
    recs = [(p, s) for p, s in recs if s is not None]
    for p, _ in recs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while recs and time.monotonic() < deadline:
        for p, _ in recs:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p, os.WNOHANG)
        recs = [(p, s) for p, s in recs if start_time(p) == s]
        time.sleep(0.02)
    for p, s in recs:
        if start_time(p) == s:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def pod_cgroup_uids(node: str) -> set[str]:
    """Pod uids with a cgroup under the node's corral subtree (see corral.runtime.cgroups)."""
    from corral.runtime import cgroups

    bases = [os.path.join(cgroups.CGROUP_ROOT, c, "corral", node) for c in cgroups.V1_CONTROLLERS]
    bases.append(os.path.join(cgroups.node_unified_dir(node), "pods"))
    uids: set[str] = set()
    for base in bases:
        with contextlib.suppress(OSError):
            uids.update(
                n for n in os.listdir(base) if os.path.isdir(os.path.join(base, n)) and n != "pods"
            )
    return uids


def cgroup_node_names(cluster: str) -> set[str]:
    """Nodes of `cluster` that still have a corral cgroup subtree (found with no other record)."""
    from corral.runtime import cgroups

    pattern = re.compile(
        rf"^{re.escape(cluster)}-node-[0-9]+$" if cluster != "corral" else r"^node-[0-9]+$"
    )
    found: set[str] = set()
    for ctrl in (*cgroups.V1_CONTROLLERS, "unified"):
        with contextlib.suppress(OSError):
            found.update(
                n
                for n in os.listdir(os.path.join(cgroups.CGROUP_ROOT, ctrl, "corral"))
                if pattern.match(n)
            )
    return found


def remove_pod_cgroups(node: str) -> int:
    """Kill the node's pod processes (they have their own net and mount namespaces,
    so only their cgroups find them) and remove its cgroups. Returns pods found."""
    from corral.runtime import cgroups

    uids = pod_cgroup_uids(node)
    for uid in uids:
        cgroups.PodCgroups(node, uid).remove()
    cgroups.remove_node_dirs(node)
    return len(uids)


# ------------------------------------------------------------------ Node objects


def node_object(cluster: str, node: NodeState) -> Node:
    from corral.nodeagent.agent import node_capacity

    resources = node_capacity()
    return Node(
        metadata=ObjectMeta(
            name=node.name, labels={CLUSTER_LABEL: cluster, HOSTNAME_LABEL: node.name}
        ),
        status=NodeStatus(
            addresses=[
                NodeAddress(type="InternalIP", address=node.ip),
                NodeAddress(type="Hostname", address=node.name),
            ],
            capacity=dict(resources),
            allocatable=dict(resources),
            conditions=[
                NodeCondition(
                    type="Ready",
                    status="Unknown",
                    reason="NodeStatusNeverUpdated",
                    message="the node agent has not reported yet",
                    last_heartbeat_time=now_iso(),
                    last_transition_time=now_iso(),
                )
            ],
        ),
    )


async def register(store: Store, cluster: str, node: NodeState) -> bool:
    """Create the Node unless it exists (its agent may have updated it). True if created."""
    try:
        await store.create(node_object(cluster, node))
    except AlreadyExists:
        return False
    return True
