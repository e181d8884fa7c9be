"""The local multi-node cluster: `corral up`, `down`, `status` and `node-exec`.

`up` converges: it records what it is about to make in the state file, then
makes whatever is missing (underlay, etcd, node namespaces, holders, Node
objects, daemons) and leaves what already works alone. `down` removes
everything it finds through the state file and, when that is gone or partial,
through the names derived from the cluster name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.api.namespaces import ensure_builtin
from corral.api.objects import Node
from corral.api.store import Store, StoreError, TLSFiles, endpoints_use_tls, parse_endpoints
from corral.cluster import daemons, dnsworkload, etcdauth, nodes, pki, underlay
from corral.cluster import state as st
from corral.cluster.etcd import EtcdError, LocalEtcd, free_port
from corral.cluster.etcd import health as etcd_health
from corral.cluster.state import ClusterState, EtcdMember, NodeState
from corral.common.files import write_atomic
from corral.node import netns
from corral.node.procs import ProcRecord, spawn, start_time, stop

DEFAULT_NODES = 3
MAX_NODES = 50
DEFAULT_UNDERLAY = "10.250.0.0/24"
MAX_DNS_REPLICAS = 50
RESERVED = {
    "the cluster (pod) CIDR": ipaddress.ip_network("10.244.0.0/16"),
    "the service CIDR": ipaddress.ip_network("10.96.0.0/12"),
    "loopback": ipaddress.ip_network("127.0.0.0/8"),
    "link-local addresses": ipaddress.ip_network("169.254.0.0/16"),
}

Progress = Callable[[str], None]


class ClusterError(Exception):
    """A user mistake or unmet precondition; the message says what to do."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class UpOptions:
    name: str = st.DEFAULT_NAME
    nodes: int | None = None  # None: keep the running cluster's count, else DEFAULT_NODES
    etcd: list[str] | None = None
    etcd_tls: TLSFiles | None = None  # an external etcd's client certificate
    etcd_members: int | None = None  # local etcd members; None: keep the running count, else 1
    underlay_cidr: str | None = None
    state_dir: str | None = None
    wait: float = 0.0  # seconds to wait for every Node to become Ready
    dns_replicas: int | None = None  # cluster DNS pods; None: keep the running count, else 2
    etcd_auth: bool = False  # turn on the local etcd's auth: the dns certificate only reads
    progress: Progress = field(default=_stderr)


# ------------------------------------------------------------------ lookups


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


# ------------------------------------------------------------------ validation


def require_root() -> None:
    if os.geteuid() != 0:
        raise ClusterError(
            "corral needs root to create network namespaces and interfaces; run it with sudo"
        )


def _check_nodes(n: int) -> None:
    if not 1 <= n <= MAX_NODES:
        raise ClusterError(f"--nodes {n}: a local cluster has 1 to {MAX_NODES} nodes")


def _parse_cidr(cidr: str, nodes_wanted: int, own_veth: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ClusterError(
            f"--underlay-cidr {cidr!r} is not a CIDR; write it like {DEFAULT_UNDERLAY}"
        ) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ClusterError(f"--underlay-cidr {cidr}: only IPv4 underlays are supported")
    if str(net) != cidr.strip() and "/" in cidr:
        raise ClusterError(f"--underlay-cidr {cidr} has host bits set; did you mean {net}?")
    if "/" not in cidr:
        raise ClusterError(f"--underlay-cidr {cidr} has no prefix length; e.g. {net.supernet(8)}")
    if net.num_addresses - 2 < nodes_wanted + 1:
        raise ClusterError(
            f"--underlay-cidr {net} is too small for {nodes_wanted} nodes and the host; "
            f"use a larger range such as {DEFAULT_UNDERLAY}"
        )
    if net.is_multicast or net.is_unspecified or net.is_reserved:
        raise ClusterError(f"--underlay-cidr {net} is not a unicast range")
    for what, reserved in RESERVED.items():
        if net.overlaps(reserved):
            raise ClusterError(
                f"--underlay-cidr {net} overlaps {what} {reserved}; pick another range, "
                f"e.g. {DEFAULT_UNDERLAY}"
            )
    for ifname, hnet in underlay.host_networks():
        if ifname != own_veth and net.overlaps(hnet):
            raise ClusterError(
                f"--underlay-cidr {net} overlaps the host's network {hnet} on {ifname}; "
                "pick a range the host does not use"
            )
    return net


def _check_etcd(urls: list[str], tls: TLSFiles | None) -> list[str]:
    try:
        eps = parse_endpoints(urls)
        secure = endpoints_use_tls(urls)
        if tls is not None:
            tls.read()
    except ValueError as e:
        raise ClusterError(f"--etcd: {e}") from None
    if secure and tls is None:
        raise ClusterError(
            "--etcd: https:// endpoints need --etcd-cafile, --etcd-certfile and --etcd-keyfile"
        )
    scheme = "https" if secure or tls is not None else "http"
    return [f"{scheme}://{h}:{p}" for h, p in eps]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ up


def up(opts: UpOptions) -> ClusterState:
    """Create or converge the cluster; returns its state. ClusterError on bad input."""
    require_root()
    try:
        st.check_name(opts.name)
    except ValueError as e:
        raise ClusterError(str(e)) from None
    if opts.nodes is not None:
        _check_nodes(opts.nodes)
    sdir = state_dir_for(opts.name, opts.state_dir)
    _check_owner(st.load(sdir), opts.name, sdir)
    _plan(opts, sdir, st.load(sdir))  # refuse bad input before anything is made
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


def _plan(opts: UpOptions, sdir: str, old: ClusterState | None) -> ClusterState:
    """Check every input against the running cluster (if any) before anything changes."""
    name = opts.name
    count = opts.nodes or (len(old.nodes) if old else DEFAULT_NODES)
    if old is not None and count < len(old.nodes):
        raise ClusterError(
            f"cluster {name!r} has {len(old.nodes)} nodes; `corral up` only adds nodes. "
            f"Run `corral down --name {name}` first to make a smaller one"
        )
    cidr = opts.underlay_cidr or (old.underlay_cidr if old else DEFAULT_UNDERLAY)
    if old is not None and cidr != old.underlay_cidr and opts.underlay_cidr:
        raise ClusterError(
            f"cluster {name!r} runs on underlay {old.underlay_cidr}, not {cidr}; "
            f"run `corral down --name {name}` first to change it"
        )
    # the flag itself, before the host
    urls = _check_etcd(opts.etcd, opts.etcd_tls) if opts.etcd else None
    net = _parse_cidr(cidr, count, st.host_veth(name))
    if old is not None and urls and (not old.etcd_external or urls != old.etcd_urls):
        raise ClusterError(
            f"cluster {name!r} was made with etcd "
            f"{','.join(old.etcd_urls) if old.etcd_external else '(local)'}; run `corral down "
            f"--name {name}` first to change it"
        )
    hosts = list(net.hosts())
    s = old or ClusterState(
        name=name,
        state_dir=sdir,
        underlay_cidr=str(net),
        host_ip=str(hosts[-1]),
        prefixlen=net.prefixlen,
    )
    if urls:
        s.etcd_external, s.etcd_urls = True, urls
        s.etcd_node_urls = urls
        t = opts.etcd_tls
        s.etcd_tls = None if t is None else {"ca": t.ca, "cert": t.cert, "key": t.key}
    if (urls or s.etcd_external) and opts.etcd_auth:
        raise ClusterError(
            "--etcd-auth is for the local etcd; an external etcd's users and roles are its "
            "operator's (see docs/cluster.md, Cluster DNS)"
        )
    if urls and opts.etcd_members:
        raise ClusterError("--etcd-members is for the local etcd; an external one has its own")
    _plan_members(s, opts.etcd_members)
    if opts.dns_replicas is not None and not 0 <= opts.dns_replicas <= MAX_DNS_REPLICAS:
        raise ClusterError(
            f"--dns-replicas {opts.dns_replicas}: give 0 (no cluster DNS) to {MAX_DNS_REPLICAS}"
        )
    if _dns_wanted(s, opts) and dnsworkload.server_available():
        try:
            dnsworkload.check_visible_to_pods(dnsworkload.corral_argv())
        except dnsworkload.DNSSetupError as e:
            raise ClusterError(str(e)) from None
    for i in range(len(s.nodes) + 1, count + 1):
        s.nodes.append(
            NodeState(
                name=st.node_name(name, i),
                index=i,
                netns=st.node_netns(name, i),
                ip=str(hosts[i - 1]),
            )
        )
    return s


def _check_owner(old: ClusterState | None, name: str, sdir: str) -> None:
    if old is not None and old.name != name:
        raise ClusterError(
            f"{sdir} holds cluster {old.name!r}, not {name!r}; pick another --state-dir"
        )


def _up_locked(opts: UpOptions, sdir: str) -> ClusterState:
    old = st.load(sdir)
    _check_owner(old, opts.name, sdir)
    s = _plan(opts, sdir, old)
    say = opts.progress
    say(f"{'Converging' if old else 'Creating'} cluster {s.name!r} in {sdir}")
    s.save()  # names of everything below are now on record

    underlay.ensure_bridge(s.underlay_netns)
    underlay.ensure_host_link(s.underlay_netns, s.host_veth, s.host_ip, s.prefixlen)
    say(
        f"✓ underlay {s.underlay_cidr} (host {s.host_veth} {s.host_ip}, "
        f"bridge in netns {s.underlay_netns})"
    )

    _ensure_etcd(s, say)
    _ensure_etcd_auth(s, opts, say)

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

    _ensure_relay(s, say)
    _ensure_pod_credentials(s)
    _register_nodes(s, say)
    _ensure_daemons(s, say)
    waiting = opts.wait > 0 and any(d.available() for d in daemons.NODE_DAEMONS)
    if waiting:
        _wait_ready(s, opts.wait, say)
    # After the nodes are Ready: pods scheduled while only some were would all land
    # there, and nothing moves them later.
    _ensure_dns(s, opts, say)
    if waiting:
        _wait_dns(s, opts.wait, say)
    return s


def _wait_dns(s: ClusterState, timeout: float, say: Progress) -> None:
    """Until every cluster DNS replica is ready (pods can resolve names from then on).
    Only a warning when they are not: the rest of the cluster works without DNS."""
    deadline = time.monotonic() + timeout
    h = None
    while time.monotonic() < deadline:
        with contextlib.suppress(StoreError, OSError):
            h = asyncio.run(_dns_health(s))
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


def _ensure_etcd(s: ClusterState, say: Progress) -> None:
    """Every member of the local etcd running, with mutual TLS, on its recorded ports."""
    if s.etcd_external:
        say(f"✓ etcd {','.join(s.etcd_urls)} (external)")
        return
    paths = pki.ensure(s.pki_dir, [s.host_ip])
    running = [m for m in s.etcd_members if m.record is not None and m.record.alive()]
    if running and s.tls("cli") is None:
        say("  etcd was started without TLS: restarting it with mutual TLS")
        for m in running:
            stop(m.record)  # type: ignore[arg-type]
            m.record = None
        running = []
    if len(running) == len(s.etcd_members):
        say(f"✓ etcd {','.join(s.etcd_urls)} (running, mutual TLS)")
        return
    if not running:
        _kill_orphan_etcd(s)
    os.makedirs(s.logs_dir, exist_ok=True)
    servers = {m.name: _member_server(s, m, paths) for m in s.etcd_members}
    initial = {name: srv.peer_url for name, srv in servers.items()}
    s.etcd_urls = [f"https://127.0.0.1:{m.client_port}" for m in s.etcd_members]
    s.etcd_node_urls = [f"https://{s.host_ip}:{m.client_port}" for m in s.etcd_members]
    s.save()
    started = []
    try:
        for m in s.etcd_members:
            if m in running:
                continue
            srv = servers[m.name]
            srv.initial_cluster = initial if len(initial) > 1 else None
            srv.launch()
            m.record = srv.record
            started.append(m)
            s.save()
        for m in started:
            servers[m.name].wait_healthy(30)
    except (EtcdError, ProcessLookupError) as e:
        for m in started:
            if m.record is not None:
                stop(m.record)
                m.record = None
        s.save()
        raise ClusterError(f"could not start etcd: {e}") from None
    s.save()
    what = "" if len(s.etcd_members) == 1 else f"{len(s.etcd_members)} members, "
    say(f"✓ etcd {','.join(s.etcd_urls)} ({what}mutual TLS; nodes use {s.etcd_node_urls[0]})")


def _ensure_etcd_auth(s: ClusterState, opts: UpOptions, say: Progress) -> None:
    """etcd's auth on, once asked (and then for the cluster's life): cluster/etcdauth.py."""
    if s.etcd_external or not (opts.etcd_auth or s.etcd_auth):
        return
    tls = s.tls("cli")
    assert tls is not None  # the local etcd always runs with TLS
    try:
        etcdauth.enable(s.etcd_urls[0], tls)
    except (etcdauth.EtcdAuthError, subprocess.SubprocessError) as e:
        raise ClusterError(f"could not turn on etcd's auth: {e}") from None
    if not s.etcd_auth:
        s.etcd_auth = True
        s.save()
    say("✓ etcd auth on: the dns certificate may only read")


def _member_server(s: ClusterState, m: EtcdMember, paths: pki.Paths) -> LocalEtcd:
    return LocalEtcd(
        data_dir=s.member_dir(m),
        client_port=m.client_port,
        peer_port=m.peer_port,
        listen_hosts=["127.0.0.1", s.host_ip],
        name=m.name,
        log_path=os.path.join(s.logs_dir, "etcd.log" if m.index == 1 else f"etcd-{m.index}.log"),
        pki=paths,
    )


def _plan_members(s: ClusterState, want: int | None) -> None:
    """The local etcd's members, with ports fixed once (daemons keep the URLs they got)."""
    if s.etcd_external:
        return
    count = want or len(s.etcd_members) or 1
    if s.etcd_members and count != len(s.etcd_members):
        raise ClusterError(
            f"cluster {s.name!r} runs etcd with {len(s.etcd_members)} member(s), not {count}; "
            f"run `corral down --name {s.name}` first to change it"
        )
    if count not in (1, 3, 5):
        raise ClusterError(f"--etcd-members {count}: use 1, 3 or 5 (an odd number, for a quorum)")
    taken = {p for m in s.etcd_members for p in (m.client_port, m.peer_port)}
    for i in range(len(s.etcd_members) + 1, count + 1):
        ports = []
        while len(ports) < 2:
            p = free_port()
            if p not in taken:
                taken.add(p)
                ports.append(p)
        name = f"{s.name}-etcd" if i == 1 else f"{s.name}-etcd-{i}"
        s.etcd_members.append(EtcdMember(name, i, ports[0], ports[1]))


def _cmdlines() -> dict[int, list[bytes]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().split(b"\0")
            except OSError:
                continue
    return out


def _etcd_orphans(s: ClusterState, host_ips: list[str] | None = None) -> list[int]:
    """etcd processes the state file lost track of: those serving this cluster's data
    dir, or listening on the host's underlay address (only this cluster's etcd does)."""
    data = re.compile(re.escape(os.path.join(s.state_dir, "etcd")).encode() + rb"(-\d+)?$")
    urls = [f"{sch}://{ip}:".encode() for ip in host_ips or [] for sch in ("http", "https")]

    def ours(args: list[bytes]) -> bool:
        for i in range(len(args) - 1):
            if args[i] == b"--data-dir" and data.match(args[i + 1]):
                return True
            if args[i] == b"--listen-client-urls" and any(u in args[i + 1] for u in urls):
                return True
        return False

    return [
        pid
        for pid, args in _cmdlines().items()
        if args and os.path.basename(args[0]) == b"etcd" and ours(args)
    ]


def _relay_orphans(name: str) -> list[int]:
    """Relays into this cluster's nodes that the state file lost track of."""
    pattern = re.compile(rf"^{re.escape(name)}-node-\d+$".encode())
    return [
        pid
        for pid, args in _cmdlines().items()
        if b"corral.cluster.relay" in args
        and any(args[i] == b"--netns" and pattern.match(args[i + 1]) for i in range(len(args) - 1))
    ]


def _kill_orphan_etcd(s: ClusterState) -> None:
    nodes.kill_pids(_etcd_orphans(s), grace=5.0)


def _relay_targets(s: ClusterState) -> list[str]:
    out = []
    for h, p in parse_endpoints(s.etcd_urls):
        if _is_loopback(h):
            out.append(f"{'127.0.0.1' if h == 'localhost' else h}:{p}")
    return out


def _ensure_relay(s: ClusterState, say: Progress) -> None:
    targets = _relay_targets(s) if s.etcd_external else []
    if not targets:
        return
    spaces = [n.netns for n in s.nodes]
    role = "relay:" + ",".join(spaces)
    if s.relay is not None and s.relay.alive() and s.relay.role == role:
        return
    if s.relay is not None:
        stop(s.relay)
    log = os.path.join(s.logs_dir, "relay.log")
    os.makedirs(s.logs_dir, exist_ok=True)
    argv = [sys.executable, "-m", "corral.cluster.relay"]
    for ns in spaces:
        argv += ["--netns", ns]
    for t in targets:
        argv += ["--target", t]
    proc = spawn(argv, log)
    s.relay = ProcRecord.of(proc.pid, role, log=log)
    s.save()
    host, _, port = targets[0].rpartition(":")
    deadline = time.monotonic() + 20
    while not all(tcp_reachable(ns, host, int(port)) for ns in spaces):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ClusterError(f"the etcd relay into the nodes did not start; see {log}")
        time.sleep(0.05)
    say(f"✓ relay {', '.join(targets)} into every node's loopback")


def tcp_reachable(ns: str, host: str, port: int, timeout: float = 1.0) -> bool:
    """Can a TCP connection to host:port be opened from inside namespace `ns`?"""
    with netns.entered(ns):
        sock = socket.socket()
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


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


def _dns_wanted(s: ClusterState, opts: UpOptions) -> bool:
    if opts.dns_replicas is not None:
        return opts.dns_replicas > 0
    return s.dns_replicas != 0


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


def _ensure_dns(s: ClusterState, opts: UpOptions, say: Progress) -> None:
    """The cluster DNS Deployment and Service (cluster/dnsworkload.py), as asked."""
    if opts.dns_replicas is not None:
        s.dns_replicas = opts.dns_replicas
    on = s.dns_replicas != 0  # a cluster made with --dns-replicas 0 stays without
    if on and not dnsworkload.server_available():
        say("  (cluster DNS not deployed: this corral has no `dns` command yet)")
        return
    if on and any(_is_loopback(h) for h, _ in parse_endpoints(s.etcd_node_urls)):
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


def node_ready(s: ClusterState) -> dict[str, str]:
    """Ready condition status per node name, from etcd ('Missing' when no Node)."""

    async def go() -> dict[str, str]:
        async with Store(s.etcd_urls, timeout=3.0, tls=s.tls("cli")) as store:
            objs, _ = await store.list(Node)
        by = {o.name: o for o in objs}
        out = {}
        for n in s.nodes:
            o = by.get(n.name)
            c = o.status.condition("Ready") if o else None
            out[n.name] = c.status if c else ("Unknown" if o else "Missing")
        return out

    return asyncio.run(go())


def _wait_ready(s: ClusterState, timeout: float, say: Progress) -> None:
    deadline = time.monotonic() + timeout
    ready: dict[str, str] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(StoreError, OSError):
            ready = node_ready(s)
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


def summary(s: ClusterState) -> str:
    names = ", ".join(n.name for n in s.nodes)
    flag = "" if s.name == st.DEFAULT_NAME else f" --name {s.name}"
    env = "" if s.name == st.DEFAULT_NAME else f"CORRAL_CLUSTER={s.name} "
    return (
        f"Cluster {s.name!r} is up: {len(s.nodes)} nodes ({names}), etcd "
        f"{','.join(s.etcd_urls)}.\n"
        f"  {env}corral get nodes              # list the nodes\n"
        f"  corral status{flag}               # health of etcd, nodes and daemons\n"
        f"  corral node-exec{flag} {s.nodes[0].name} -- ip addr   # run a command on a node\n"
        f"  corral down{flag}                 # remove everything\n"
        f"State and logs: {s.state_dir}"
    )


# ------------------------------------------------------------------ down

_NS_RE = r"^{name}-(underlay|node-\d+)$"


def down(
    name: str = st.DEFAULT_NAME, state_dir: str | None = None, progress: Progress = _stderr
) -> bool:
    """Remove the cluster, whatever state it is in. True if there was anything to remove."""
    require_root()
    try:
        st.check_name(name)
    except ValueError as e:
        raise ClusterError(str(e)) from None
    sdir = state_dir_for(name, state_dir)
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
    relays = _relay_orphans(name)
    if relays:
        nodes.kill_pids(relays)
    host_ips = underlay.addresses(st.host_veth(name)) + ([s.host_ip] if s is not None else [])
    orphans = _etcd_orphans(
        ClusterState(name=name, state_dir=sdir, underlay_cidr="", host_ip="", prefixlen=0), host_ips
    )
    if orphans:
        nodes.kill_pids(orphans, grace=5.0)
        say(f"✓ stopped etcd (pid {', '.join(map(str, orphans))})")
    if s is not None and s.etcd_external:
        _forget_nodes(s)
    if underlay.remove_host_link(st.host_veth(name)):
        found = True
        say(f"✓ removed host interface {st.host_veth(name)}")
    for ns in sorted(spaces):
        if netns.remove(ns):
            found = True
            say(f"✓ removed netns {ns}")
    if os.path.isdir(sdir):
        shutil.rmtree(sdir, ignore_errors=True)
        say(f"✓ removed {sdir}")
    return found


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


# ------------------------------------------------------------------ status


@dataclass
class NodeHealth:
    name: str
    ip: str
    netns: bool
    holder: bool
    daemons: dict[str, bool]  # daemon -> its process is alive
    ready: str
    healthz: dict[str, str] = field(default_factory=dict)  # daemon -> "ok" or why not


@dataclass
class Health:
    name: str
    etcd_urls: list[str]
    etcd_ok: bool
    etcd_error: str
    nodes: list[NodeHealth]
    relay: bool | None = None  # None: no relay (local etcd, or no loopback endpoint)
    etcd_members: dict[str, bool] = field(default_factory=dict)  # local members' health
    dns: dnsworkload.DNSHealth | None = None  # None: not deployed (or etcd unreachable)

    @property
    def ok(self) -> bool:
        return (
            self.etcd_ok
            and all(self.etcd_members.values())
            and self.relay is not False
            and (self.dns is None or self.dns.answering)
            and all(
                n.netns
                and n.holder
                and all(n.daemons.values())
                and all(v == "ok" for v in n.healthz.values())
                and (n.ready == "True" or "node" not in n.daemons)
                for n in self.nodes
            )
        )


async def _dns_health(s: ClusterState) -> dnsworkload.DNSHealth | None:
    async with Store(s.etcd_urls, timeout=3.0, tls=s.tls("cli")) as store:
        return await dnsworkload.health(store)


def etcd_healthy(urls: list[str], tls: TLSFiles | None = None) -> tuple[bool, str]:
    err = "no endpoint"
    for u in urls:
        ok, why = etcd_health(u, tls, timeout=2)
        if ok:
            return True, ""
        err = f"{u}: {why}"
    return False, err


def daemon_healthz(url: str, timeout: float = 2.0) -> str:
    """ "ok", or why the daemon at `url` (its /healthz) is not healthy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "?verbose", timeout=timeout) as r:
            r.read()
            return "ok"
    except urllib.error.HTTPError as e:
        lines = e.read().decode(errors="replace").splitlines()
        failed = [ln.removeprefix("[-]") for ln in lines if ln.startswith("[-]")]
        return "; ".join(failed) or f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"no answer from {url} ({getattr(e, 'reason', e)})"


def _healthz_all(s: ClusterState) -> dict[tuple[str, str], str]:
    """(daemon, node) -> daemon_healthz, asked of every daemon with a port, in parallel."""
    asks = {}
    for r in s.daemons:
        d = daemons.by_name(r.role.removeprefix("daemon:"))
        n = s.node(r.node or "")
        if d is not None and n is not None and (url := d.url(n.ip)) and r.alive():
            asks[(d.name, n.name)] = url
    if not asks:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(8, len(asks))) as pool:
        results = pool.map(daemon_healthz, asks.values())
        return dict(zip(asks, results, strict=True))


def status(name: str = st.DEFAULT_NAME, state_dir: str | None = None) -> Health:
    s = load_state(name, state_dir)
    if s is None:
        raise ClusterError(
            f"no local cluster named {name!r} (no state in {state_dir_for(name, state_dir)}); "
            f"start one with `corral up{'' if name == st.DEFAULT_NAME else ' --name ' + name}`"
        )
    tls = s.tls("cli")
    ok, err = etcd_healthy(s.etcd_urls, tls)
    members = {}
    if not s.etcd_external and len(s.etcd_members) > 1:
        members = {
            m.name: etcd_health(f"https://127.0.0.1:{m.client_port}", tls, timeout=2)[0]
            for m in s.etcd_members
        }
    ready: dict[str, str] = {}
    dns = None
    if ok:
        try:
            ready = node_ready(s)
            dns = asyncio.run(_dns_health(s))
        except (StoreError, OSError) as e:
            ok, err = False, str(e)
    out = []
    healthz = _healthz_all(s)
    for n in s.nodes:
        ds = {r.role.removeprefix("daemon:"): r.alive() for r in s.daemons if r.node == n.name}
        out.append(
            NodeHealth(
                name=n.name,
                ip=n.ip,
                netns=netns.exists(n.netns),
                holder=n.holder is not None and n.holder.alive(),
                daemons=ds,
                ready=ready.get(n.name, "?"),
                healthz={d: h for (d, node), h in healthz.items() if node == n.name},
            )
        )
    return Health(
        name=s.name,
        etcd_urls=s.etcd_urls,
        etcd_ok=ok,
        etcd_error=err,
        nodes=out,
        relay=None if s.relay is None else s.relay.alive(),
        etcd_members=members,
        dns=dns,
    )


# ------------------------------------------------------------------ node-exec


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
