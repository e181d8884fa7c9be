"""`corral up`: create or converge the local cluster.

It records what it is about to make in the state file, then makes whatever is
missing (underlay, etcd, node namespaces, holders, Node objects, daemons, the
cluster DNS) and leaves what already works alone. Its input is checked first
(cluster/plan.py); the etcd steps are cluster/etcdsetup.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time

import yaml

from corral.api.namespaces import ensure_builtin
from corral.api.store import Store, StoreError, parse_endpoints
from corral.cluster import (
    daemons,
    dnsworkload,
    etcdsetup,
    health,
    kubeconfig,
    local,
    nodes,
    plan,
    underlay,
)
from corral.cluster import state as st
from corral.cluster.local import ClusterError, Progress
from corral.cluster.plan import UpOptions
from corral.cluster.state import ClusterState
from corral.common.files import write_atomic
from corral.node.procs import ProcRecord, stop


def up(opts: UpOptions) -> ClusterState:
    """Create or converge the cluster; returns its state. ClusterError on bad input."""
    local.require_root()
    try:
        st.check_name(opts.name)
    except ValueError as e:
        raise ClusterError(str(e)) from None
    if opts.nodes is not None:
        plan.check_nodes(opts.nodes)
    sdir = local.state_dir_for(opts.name, opts.state_dir)
    plan.check_owner(st.load(sdir), opts.name, sdir)
    plan.plan(opts, sdir, st.load(sdir))  # refuse bad input before anything is made
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with st.locked(sdir):
            return _up_locked(opts, sdir)
    except ClusterError:
        raise
    except (RuntimeError, OSError, NetlinkError, subprocess.SubprocessError) as e:
        raise ClusterError(
            f"{e}. What was made so far is recorded in {sdir}: `corral up` again "
            f"retries, `corral down --name {opts.name}` removes it"
        ) from None


def _up_locked(opts: UpOptions, sdir: str) -> ClusterState:
    old = st.load(sdir)
    plan.check_owner(old, opts.name, sdir)
    s = plan.plan(opts, sdir, old)
    say = opts.progress
    say(f"{'Converging' if old else 'Creating'} cluster {s.name!r} in {sdir}")
    s.save()  # names of everything below are now on record

    underlay.ensure_bridge(s.underlay_netns)
    underlay.ensure_host_link(s.underlay_netns, s.host_veth, s.host_ip, s.prefixlen)
    say(
        f"✓ underlay {s.underlay_cidr} (host {s.host_veth} {s.host_ip}, "
        f"bridge in netns {s.underlay_netns})"
    )

    etcdsetup.ensure_etcd(s, say)
    etcdsetup.ensure_auth(s, opts.etcd_auth, say)

    for n in s.nodes:
        underlay.ensure_node_link(s.underlay_netns, n.netns, n.index, n.ip, s.prefixlen)
        nodes.prepare_dirs(s, n)
        if n.holder is None or not n.holder.alive() or not nodes.holder_in_netns(n.holder, n.netns):
            # Processes left from an old holder see stale mounts or an old
            # namespace: replace them too.
            nodes.kill_pids(nodes.pids_in_node(n.netns, n.mnt_ns, n.holder))
            n.holder = nodes.start_holder(s, n)
            n.mnt_ns = nodes.mount_ns_inode(n.holder.pid)
            s.save()
        say(f"✓ {n.name} {n.ip} (netns {n.netns})")

    if opts.apiservers is not None:  # checked by plan.plan
        s.apiservers = opts.apiservers
    etcdsetup.ensure_relay(s, say)
    _ensure_pod_credentials(s)
    _register_nodes(s, say)
    say(f"✓ kubeconfig {kubeconfig.ensure(s)} (API server {kubeconfig.server_url(s)})")
    _ensure_daemons(s, say)
    _merge_kubeconfig(s, say)
    waiting = opts.wait > 0 and any(d.available() for d in daemons.NODE_DAEMONS)
    if waiting:
        _wait_ready(s, opts.wait, say)
    # After the nodes are Ready: pods scheduled while only some were would all land
    # there, and nothing moves them later.
    _ensure_dns(s, opts, say)
    if opts.lb_pool:
        _ensure_lb_pool(s, opts.lb_pool, say)
    if waiting:
        _wait_dns(s, opts.wait, say)
    return s


def _merge_kubeconfig(s: ClusterState, say: Progress) -> None:
    """Context `corral-<name>` in $KUBECONFIG or ~/.kube/config, made current (as kind
    does); a file that is not a kubeconfig is left alone with a warning."""
    try:
        target = kubeconfig.merge(kubeconfig.render(s))
    except (OSError, ValueError, yaml.YAMLError) as e:
        say(f"  (kubeconfig context not merged: {e}; use `corral kubeconfig --name {s.name}`)")
        return
    say(f"✓ context corral-{s.name} in {target} (current)")


def _register_nodes(s: ClusterState, say: Progress) -> None:
    async def go() -> list[bool]:
        async with Store(s.etcd_urls, tls=s.tls("cli")) as store:
            await ensure_builtin(store)  # default, kube-system, kube-public, corral-system
            return [await nodes.register(store, s.name, n) for n in s.nodes]

    try:
        created = asyncio.run(go())
    except StoreError as e:
        raise ClusterError(f"could not register nodes in etcd: {e}") from None
    say(f"✓ {len(s.nodes)} Node objects in etcd ({sum(created)} new)")


def _ensure_daemons(s: ClusterState, say: Progress) -> None:
    want = daemons.wanted(s)
    keep: list[ProcRecord] = []
    for d, n in want:
        rec = daemons.find(s, d, n)
        if rec is None or not rec.alive():
            rec = daemons.start(s, d, n)
            s.daemons = [r for r in s.daemons if not (r.role == rec.role and r.node == n.name)] + [
                rec
            ]
            s.save()
            say(f"✓ {d.name} on {n.name} (pid {rec.pid}, log {rec.log})")
        keep.append(rec)
    for r in s.daemons:
        if r not in keep:
            stop(r)
    s.daemons = keep
    s.save()
    if not want:
        say("  (no node daemons available yet: `corral node` is not installed)")


def _wait_ready(s: ClusterState, timeout: float, say: Progress) -> None:
    deadline = time.monotonic() + timeout
    ready: dict[str, str] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(StoreError, OSError):
            ready = health.node_ready(s)
            if all(v == "True" for v in ready.values()):
                say(f"✓ all {len(ready)} nodes Ready")
                return
        time.sleep(0.5)
    late = sorted(k for k, v in ready.items() if v != "True") or [n.name for n in s.nodes]
    raise ClusterError(
        f"not Ready after {timeout:.0f}s: {', '.join(late)}; see the logs in {s.logs_dir}. "
        f"The cluster is left running: `corral status --name {s.name}` shows what is "
        f"down, `corral down --name {s.name}` removes it"
    )


def _ensure_pod_credentials(s: ClusterState) -> None:
    """The DNS pods' etcd client certificate, as the nodes' credential set `etcd-dns`:
    the `dns` role's on the local etcd, the one given to `up` on an external etcd."""
    d = os.path.join(s.pod_credentials_dir, dnsworkload.CREDENTIALS)
    os.makedirs(d, mode=0o700, exist_ok=True)
    for p in (s.pod_credentials_dir, d):
        os.chmod(p, 0o700)
    tls = s.tls("dns")
    if tls is None:
        return  # etcd without TLS: the pods need no certificate
    for src, name, mode in (
        (tls.ca, dnsworkload.CA, 0o644),
        (tls.cert, dnsworkload.CERT, 0o644),
        (tls.key, dnsworkload.KEY, 0o600),
    ):
        if not src:
            continue
        with open(src, "rb") as f:
            data = f.read()
        dst = os.path.join(d, name)
        with contextlib.suppress(OSError), open(dst, "rb") as f:
            if f.read() == data:
                continue
        write_atomic(dst, data, mode)


LB_POOL_NAME = "underlay"


def _ensure_lb_pool(s: ClusterState, cidr: str, say: Progress) -> None:
    """--lb-pool: the LoadBalancerPool `underlay` with that CIDR (replaced if it differs)."""
    from corral.api.objects import LoadBalancerPool

    async def go() -> None:
        async with Store(s.etcd_urls, tls=s.tls("cli")) as store:
            have = await store.get(LoadBalancerPool, LB_POOL_NAME)
            if have is not None and have.spec.cidrs == [cidr]:
                return
            pool = LoadBalancerPool(metadata={"name": LB_POOL_NAME}, spec={"cidrs": [cidr]})
            if have is None:
                await store.create(pool)
            else:
                have.spec.cidrs = [cidr]
                await store.update(have)

    try:
        asyncio.run(go())
    except StoreError as e:
        raise ClusterError(f"could not write the LoadBalancerPool: {e}") from None
    say(f"✓ LoadBalancerPool {LB_POOL_NAME} {cidr} (announced with ARP on the underlay)")


def _ensure_dns(s: ClusterState, opts: UpOptions, say: Progress) -> None:
    """The cluster DNS Deployment and Service (cluster/dnsworkload.py), as asked."""
    if opts.dns_replicas is not None:
        s.dns_replicas = opts.dns_replicas
    on = s.dns_replicas != 0  # a cluster made with --dns-replicas 0 stays without
    if on and not dnsworkload.server_available():
        say("  (cluster DNS not deployed: this corral has no `dns` command yet)")
        return
    if on and any(local.is_loopback(h) for h, _ in parse_endpoints(s.etcd_node_urls)):
        say(
            "  (cluster DNS not deployed: pods cannot reach an etcd on the nodes' loopback "
            "relay; give `--etcd` an address the nodes route to)"
        )
        return
    s.corral_argv = dnsworkload.corral_argv()
    s.save()
    cmd = dnsworkload.server_command(s.corral_argv, s.etcd_node_urls, s.tls("dns") is not None)

    async def go() -> str:
        async with Store(s.etcd_urls, tls=s.tls("cli")) as store:
            # None keeps the running count (a user's `corral scale`), 2 when creating
            return await dnsworkload.ensure(store, opts.dns_replicas if on else 0, cmd)

    try:
        say(f"✓ {asyncio.run(go())}")
    except StoreError as e:
        raise ClusterError(f"could not write the cluster DNS objects: {e}") from None


def _wait_dns(s: ClusterState, timeout: float, say: Progress) -> None:
    """Until every cluster DNS replica is ready (pods can resolve names from then on).
    Only a warning when they are not: the rest of the cluster works without DNS."""
    deadline = time.monotonic() + timeout
    h = None
    while time.monotonic() < deadline:
        with contextlib.suppress(StoreError, OSError):
            h = asyncio.run(health.dns_health(s))
            if h is None or h.ok:
                break
        time.sleep(0.5)
    if h is None:
        return
    if h.ok:
        say(f"✓ {h.line()}")
    else:
        say(
            f"  {h.line()} after {timeout:.0f}s: see `corral get pods -n {dnsworkload.NAMESPACE}` "
            "and `corral logs -n corral-system POD`"
        )


def summary(s: ClusterState) -> str:
    names = ", ".join(n.name for n in s.nodes)
    flag = "" if s.name == st.DEFAULT_NAME else f" --name {s.name}"
    env = "" if s.name == st.DEFAULT_NAME else f"CORRAL_CLUSTER={s.name} "
    return (
        f"Cluster {s.name!r} is up: {len(s.nodes)} nodes ({names}), etcd "
        f"{','.join(s.etcd_urls)}.\n"
        f"  {env}corral get nodes              # list the nodes\n"
        f"  kubectl get nodes                # the Kubernetes API (context corral-{s.name})\n"
        f"  corral status{flag}               # health of etcd, nodes and daemons\n"
        f"  corral node-exec{flag} {s.nodes[0].name} -- ip addr   # run a command on a node\n"
        f"  corral down{flag}                 # remove everything\n"
        f"State and logs: {s.state_dir}"
    )
