"""`corral down`: remove the local cluster, whatever state it is in.

Everything the state file records, and, when that is gone or partial, whatever
the names derived from the cluster's name find: its namespaces, the processes
in them, its pods (by their cgroups), pinned BPF maps, and etcd or relay
processes the state file lost (cluster/orphans.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil

import yaml

from corral.api.objects import Node
from corral.api.store import Store, StoreError
from corral.cluster import kubeconfig, local, nodes, orphans, underlay
from corral.cluster import state as st
from corral.cluster.local import ClusterError, Progress, on_stderr
from corral.cluster.state import ClusterState
from corral.node import netns
from corral.node.procs import ProcRecord, stop

_NS_RE = r"^{name}-(underlay|node-\d+)$"


def down(
    name: str = st.DEFAULT_NAME, state_dir: str | None = None, progress: Progress = on_stderr
) -> bool:
    """Remove the cluster, whatever state it is in. True if there was anything to remove."""
    local.require_root()
    try:
        st.check_name(name)
    except ValueError as e:
        raise ClusterError(str(e)) from None
    sdir = local.state_dir_for(name, state_dir)
    try:
        with st.locked(sdir):
            found = _down_locked(name, sdir, progress)
    except RuntimeError as e:
        raise ClusterError(str(e)) from None
    lock = os.path.join(os.path.dirname(sdir), f".{os.path.basename(sdir)}.lock")
    with contextlib.suppress(OSError):
        os.unlink(lock)
    return found


def _remove_pins(node: str) -> list[str]:
    from corral.ebpf import loader

    try:
        return loader.remove_pins(node)
    except (OSError, ValueError):
        return []


def _down_locked(name: str, sdir: str, say: Progress) -> bool:
    s = st.load(sdir)
    if s is not None and s.name != name:
        raise ClusterError(f"{sdir} holds cluster {s.name!r}, not {name!r}")
    found = s is not None or os.path.isdir(sdir)
    pattern = re.compile(_NS_RE.format(name=re.escape(name)))
    spaces = {n for n in netns.list_names(f"{name}-") if pattern.match(n)}
    mnt: dict[str, int | None] = {}
    holders: dict[str, ProcRecord | None] = {}
    if s is not None:
        spaces |= {n.netns for n in s.nodes}
        mnt = {n.netns: n.mnt_ns for n in s.nodes}
        holders = {n.netns: n.holder for n in s.nodes}
        for rec in [*s.daemons, *([s.relay] if s.relay else [])]:
            if stop(rec):
                say(
                    f"✓ stopped {rec.role.removeprefix('daemon:')}"
                    f"{' on ' + rec.node if rec.node else ''} (pid {rec.pid})"
                )
    for ns in sorted(spaces):
        pids = nodes.pids_in_node(ns, mnt.get(ns), holders.get(ns))
        if pids:
            nodes.kill_pids(pids)
            say(f"✓ stopped {len(pids)} processes in {ns}")
    # Pods have their own namespaces: their cgroups find them, once no agent is
    # left to restart them.
    node_names = {
        st.node_name(name, int(ns.rsplit("-", 1)[1]))
        for ns in spaces
        if not ns.endswith("-underlay")
    }
    node_names |= {n.name for n in s.nodes} if s is not None else set()
    node_names |= nodes.cgroup_node_names(name)
    for node in sorted(node_names):
        pods = nodes.remove_pod_cgroups(node)
        found = True
        if pods:
            say(f"✓ stopped {pods} pods of {node}")
        pins = _remove_pins(node)  # the fast path's maps pinned for the proxy
        if pins:
            say(f"✓ removed pinned BPF maps of {node} ({', '.join(pins)})")
    for rec in s.etcd_records if s is not None else []:
        if stop(rec):
            say(f"✓ stopped etcd (pid {rec.pid})")
    relays = orphans.relay_orphans(name)
    if relays:
        nodes.kill_pids(relays)
    host_ips = underlay.addresses(st.host_veth(name)) + ([s.host_ip] if s is not None else [])
    lost = orphans.etcd_orphans(sdir, host_ips)
    if lost:
        nodes.kill_pids(lost, grace=5.0)
        say(f"✓ stopped etcd (pid {', '.join(map(str, lost))})")
    if s is not None and s.etcd_external:
        _forget_nodes(s)
    if underlay.remove_host_link(st.host_veth(name)):
        found = True
        say(f"✓ removed host interface {st.host_veth(name)}")
    for ns in sorted(spaces):
        if netns.remove(ns):
            found = True
            say(f"✓ removed netns {ns}")
    _unmerge_kubeconfig(name, say)
    if os.path.isdir(sdir):
        shutil.rmtree(sdir, ignore_errors=True)
        say(f"✓ removed {sdir}")
    return found


def _unmerge_kubeconfig(name: str, say: Progress) -> None:
    """Take context `corral-<name>` out of the user's kubeconfig again (as kind does)."""
    try:
        if kubeconfig.unmerge(name):
            say(f"✓ removed context corral-{name} from {kubeconfig.user_path()}")
    except (OSError, ValueError, yaml.YAMLError) as e:
        say(f"  (context corral-{name} not removed from {kubeconfig.user_path()}: {e})")


def _forget_nodes(s: ClusterState) -> None:
    """Delete this cluster's Node objects from an external etcd (best effort)."""

    async def go() -> None:
        async with Store(s.etcd_urls, timeout=3.0, tls=s.tls("cli")) as store:
            for n in s.nodes:
                obj = await store.get(Node, n.name)
                if obj is not None and obj.metadata.labels.get(nodes.CLUSTER_LABEL) == s.name:
                    with contextlib.suppress(StoreError):
                        await store.delete(Node, n.name)

    with contextlib.suppress(StoreError, OSError, TimeoutError):
        asyncio.run(go())
