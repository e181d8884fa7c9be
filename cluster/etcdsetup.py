"""The cluster's etcd as `corral up` makes it: the local members (ports fixed once,
mutual TLS, auth when asked), or an external etcd, which the relay brings into
every node's loopback when the host reaches it on its own loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from corral.api.store import parse_endpoints
from corral.cluster import etcdauth, nodes, orphans, pki
from corral.cluster.etcd import EtcdError, LocalEtcd, free_port
from corral.cluster.local import ClusterError, Progress, is_loopback
from corral.cluster.state import ClusterState, EtcdMember
from corral.node import netns
from corral.node.procs import ProcRecord, spawn, stop


def plan_members(s: ClusterState, want: int | None) -> None:
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


def ensure_etcd(s: ClusterState, say: Progress) -> None:
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
        nodes.kill_pids(orphans.etcd_orphans(s.state_dir), grace=5.0)
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


def ensure_auth(s: ClusterState, asked: bool, say: Progress) -> None:
    """etcd's auth on, once asked (and then for the cluster's life): cluster/etcdauth.py."""
    if s.etcd_external or not (asked or s.etcd_auth):
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


def ensure_relay(s: ClusterState, say: Progress) -> None:
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


def _relay_targets(s: ClusterState) -> list[str]:
    out = []
    for h, p in parse_endpoints(s.etcd_urls):
        if is_loopback(h):
            out.append(f"{'127.0.0.1' if h == 'localhost' else h}:{p}")
    return out


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
