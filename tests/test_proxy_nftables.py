"""The nftables mode: its ruleset (pure), and against real nf_tables in namespaces.

Kernel cases run in scratch namespaces made and removed here: the table's
life (partial syncs carrying only what changed, repair, cleanup, two tables
side by side, mode switches), and a small routed node with three pod
namespaces for the data path (ClusterIP spread, REJECT, ClientIP affinity,
hairpin, NodePort with masquerade, the node's own connections).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from corral.node import netns
from corral.proxy import nftrules as N
from corral.proxy.core import EndpointInfo, ServicePort, ServiceView
from corral.proxy.iptables import IptablesMode, Netfilter
from corral.proxy.nftables import Nft, NftablesMode
from tests.kit import scratch_netns, wait_for

CIDR = "10.244.0.0/16"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
pytestmark = pytest.mark.skipif(NftablesMode.unavailable() is not None, reason="no libnftables")


def view(sp: ServicePort, ips: list[str], port: int = 8080) -> ServiceView:
    eps = tuple(EndpointInfo(ip, port) for ip in ips)
    return ServiceView((sp,), ((sp.key, eps),) if eps else ())


A = ServicePort("default/a", "", "TCP", "10.96.0.1", 80, node_port=30001, affinity_timeout=9)
B = ServicePort("default/b", "dns", "UDP", "10.96.0.2", 53)


# ---------------------------------------------------------------- the ruleset (pure)


def test_an_endpoint_change_touches_only_its_service() -> None:
    old = {k: N.service_rules(v, CIDR) for k, v in
           {"default/a": view(A, ["10.244.1.2", "10.244.1.3"]),
            "default/b": view(B, ["10.244.1.4"])}.items()}  # fmt: skip
    new_a = N.service_rules(view(A, ["10.244.1.3", "10.244.1.5"]), CIDR)
    text = N.partial("corral-n", {"default/a": old["default/a"]}, {"default/a": new_a}).text()
    assert "default/b" not in text
    gone_ep = N.ep_chain(A, EndpointInfo("10.244.1.2", 8080))
    kept_ep = N.ep_chain(A, EndpointInfo("10.244.1.3", 8080))
    new_ep = N.ep_chain(A, EndpointInfo("10.244.1.5", 8080))
    assert f"delete chain ip corral-n {gone_ep}" in text
    assert kept_ep not in text.replace(f"goto {kept_ep}", "")  # only referred to, not rewritten
    assert f"add chain ip corral-n {new_ep}" in text and "numgen random mod 2 0 goto" in text
    # the gone endpoint's affinity set goes with it (its clients are forgotten at once)
    assert f"delete set ip corral-n {N.affinity_set(A, EndpointInfo('10.244.1.2', 8080))}" in text
    # a service losing every endpoint moves from service-ips to no-endpoint-services
    none = N.service_rules(view(B, []), CIDR)
    text = N.partial("corral-n", {"default/b": old["default/b"]}, {"default/b": none}).text()
    assert "add element ip corral-n no-endpoint-services { 10.96.0.2 . udp . 53 : goto" in text
    assert "delete element ip corral-n service-ips { 10.96.0.2 . udp . 53 }" in text
    # the same VIP dispatching to another service's chain in one batch: a full sync's job
    other = N.service_rules(view(ServicePort("default/c", "", "TCP", "10.96.0.1", 80),
                                 ["10.244.1.9"]), CIDR)  # fmt: skip
    with pytest.raises(N.VerdictChanged):
        N.partial("corral-n", {"default/a": old["default/a"], "default/c": None},
                  {"default/a": None, "default/c": other})  # fmt: skip


def test_table_names_carry_the_node() -> None:
    assert N.table_name("node-1") != N.table_name("node-2")
    assert N.table_name("we ird/name") == "corral-we_ird_name"


# ---------------------------------------------------------------- the table's life


def nft_text(ns: str, *what: str) -> str:
    p = subprocess.run(netns.command(ns, ["nft", "list", *what]), capture_output=True, text=True)
    return p.stdout


def elements(nft: Nft, table: str, m: str) -> dict[str, str]:
    from corral.proxy.nftables import describe

    return describe(nft.table(table), table)["maps"].get(m, {})


@needs_root
def test_sync_partial_repair_and_cleanup(scratch_ns: str) -> None:
    ns = scratch_ns
    nft = Nft(ns)
    mode = NftablesMode(CIDR, ns, nft, Netfilter(ns))
    t = mode.table
    views = {"default/a": view(A, ["10.244.1.2", "10.244.1.3"]), "default/b": view(B, [])}
    assert mode.sync(False, views, set()).full  # the first sync is full whatever was asked
    assert elements(nft, t, "service-ips") == {"10.96.0.1 . tcp . 80": f"goto {N.svc_chain(A)}"}
    assert elements(nft, t, "service-nodeports") == {"tcp . 30001": f"goto {N.ext_chain(A)}"}
    assert elements(nft, t, "no-endpoint-services") == {"10.96.0.2 . udp . 53": "goto reject-chain"}
    assert mode.canary_ok()
    # the component asks from whichever executor thread is free: every one sees the table
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as ex:
        assert all(ex.map(lambda _: mode.canary_ok(), range(6)))
    from corral.netdebug.explain import EXPLAINERS

    d = EXPLAINERS["nftables"].decide(mode.debug(), "10.96.0.2", 53, "UDP", "10.0.0.8")
    assert d.found and "has no endpoints" in d.why and "ICMP" in d.why
    # b gets an endpoint: one transaction about b only
    views["default/b"] = view(B, ["10.244.1.4"], 5353)
    before = nft.transactions
    r = mode.sync(False, views, {"default/b"})
    assert not r.full and nft.transactions == before + 1
    assert "default/a" not in mode.last_text
    assert "10.96.0.2 . udp . 53" in elements(nft, t, "service-ips")
    assert elements(nft, t, "no-endpoint-services") == {}
    # a hand-deleted element: a partial sync about that service still works (its delete
    # is idempotent) and puts it back; a full sync puts back every other one
    nft.apply(f"delete element ip {t} service-ips {{ 10.96.0.2 . udp . 53 }}")
    mode.sync(False, views, {"default/b"})
    assert "10.96.0.2 . udp . 53" in elements(nft, t, "service-ips")
    nft.apply(f"delete element ip {t} service-ips {{ 10.96.0.1 . tcp . 80 }}")
    mode.sync(True, views, set())
    assert "10.96.0.1 . tcp . 80" in elements(nft, t, "service-ips")
    # a flushed table (every chain emptied) and a deleted one: the canary says so, the
    # repairing full sync restores everything
    for damage in (f"flush table ip {t}", f"flush chain ip {t} nat-prerouting",
                   f"delete table ip {t}"):  # fmt: skip
        nft.apply(damage)
        assert not mode.canary_ok(), damage
        mode.forget_kernel()
        mode.sync(True, views, set())
        assert mode.canary_ok(), damage
        assert "dnat to 10.244.1.2:8080" in nft_text(ns, "table", "ip", t)
    # a restarted proxy (a new mode object) rewrites the same chains in place, keeps the
    # affinity sets' clients and deletes what nobody wants any more
    aff = N.affinity_set(A, EndpointInfo("10.244.1.2", 8080))
    nft.apply(f"add element ip {t} {aff} {{ 10.0.0.7 timeout 60s }}")
    # `corral net services/trace` read the same state from the debug dump
    from corral.netdebug.explain import EXPLAINERS

    ex = EXPLAINERS["nftables"]
    dump = mode.debug()
    entries = {(e.vip, e.port, e.protocol): e for e in ex.table(dump)}
    a_entry = entries[("10.96.0.1", 80, "TCP")]
    assert a_entry.backends == ["10.244.1.2:8080", "10.244.1.3:8080"], a_entry
    assert a_entry.name == "default/a:80" and a_entry.affinity_timeout == 9
    assert [(x.client, x.backend) for x in a_entry.affinity] == [("10.0.0.7", "10.244.1.2:8080")]
    assert entries[("10.96.0.2", 53, "UDP")].backends == ["10.244.1.4:5353"]
    d = ex.decide(dump, "10.96.0.1", 80, "TCP", "10.0.0.7")
    assert d.backend == "10.244.1.2:8080" and "affinity hit" in d.why
    d = ex.decide(dump, "10.96.0.1", 80, "TCP", "10.0.0.8")
    assert d.backend is None and "numgen cascade" in d.why
    assert not ex.decide(dump, "10.96.0.9", 80, "TCP", "10.0.0.8").found
    # `corral net check` compares the table with what etcd asks, and names what differs
    from corral.api.objects import NetworkSpec
    from corral.netdebug import check
    from corral.netdebug.model import ClusterView

    cv = ClusterView(NetworkSpec(network=CIDR), {}, {}, [], {}, {})
    cv.views = lambda: dict(views)  # type: ignore[method-assign]
    node_dump = {"components": {"proxy": {"debug": {"mode": "nftables", **dump}}}}
    assert check.check_proxy(cv, "n1", node_dump) == []
    nft.apply(f"delete element ip {t} service-nodeports {{ tcp . 30001 }}")
    nft.apply(f"flush chain ip {t} {N.svc_chain(B)}")
    node_dump["components"]["proxy"]["debug"].update(mode.debug())
    found = sorted(f.what for f in check.check_proxy(cv, "n1", node_dump))
    assert found == [
        "default/a: service-nodeports has no element tcp . 30001",
        f"default/b: chain {N.svc_chain(B)} has 0 rule(s), etcd asks 2 (flushed?)",
    ], found
    mode.sync(True, views, set())
    del views["default/b"]
    again = NftablesMode(CIDR, ns, Nft(ns), Netfilter(ns))
    again.sync(False, views, set())
    listing = nft_text(ns, "table", "ip", t)
    assert "10.0.0.7" in listing and "default/b" not in listing
    assert listing.count("jump services") == 2  # one hook rule each, no duplicates
    # --cleanup (every mode's) removes the table
    r2 = subprocess.run(
        netns.command(ns, [sys.executable, "-m", "corral", "proxy", "--cleanup", "--node", ns]),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    assert f"removed nftables table ip {t}" in r2.stdout
    assert "corral" not in nft_text(ns, "tables")


@needs_root
def test_two_proxies_and_other_software_side_by_side(scratch_ns: str) -> None:
    ns = scratch_ns
    # someone else's iptables-nft rule, and the iptables mode's state, in the same namespace
    other = ["POSTROUTING", "-m", "comment", "--comment", "not corral", "-j", "RETURN"]
    subprocess.run(netns.command(ns, ["iptables", "-t", "nat", "-A", *other]), check=True)
    one = NftablesMode(CIDR, "n1", Nft(ns), Netfilter(ns))
    two = NftablesMode("10.245.0.0/16", "n2", Nft(ns), Netfilter(ns))
    one.sync(True, {"default/a": view(A, ["10.244.1.2"])}, set())
    two.sync(True, {"default/b": view(B, ["10.245.1.2"])}, set())
    one.sync(True, {}, set())  # every service of one gone: two keeps its own
    assert "10.245.1.2" in nft_text(ns, "table", "ip", two.table)
    assert "10.244.1.2" not in nft_text(ns, "table", "ip", one.table)
    assert one.cleanup() == [f"nftables table ip {one.table}"]
    saved = subprocess.run(netns.command(ns, ["iptables-save", "-t", "nat"]),
                           capture_output=True, text=True).stdout  # fmt: skip
    assert two.canary_ok() and "not corral" in saved


def _in(ns: str, code: str) -> str:
    p = subprocess.run(netns.command(ns, [sys.executable, "-c", code]),
                       capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout


@needs_root
def test_switching_modes_leaves_nothing_of_the_other(scratch_ns: str) -> None:
    ns = scratch_ns
    views = {"default/a": view(A, ["10.244.1.2"])}
    IptablesMode(CIDR, Netfilter(ns)).sync(True, views, set())
    switch = "from corral.proxy import mode as m; m.remove_other_modes(m.mode_class({!r}), {!r})"
    _in(ns, switch.format("nftables", ns))  # what `corral proxy --mode nftables` runs first
    assert "CORRAL-" not in subprocess.run(netns.command(ns, ["iptables-save"]),
                                           capture_output=True, text=True).stdout  # fmt: skip
    nf = NftablesMode(CIDR, ns, Nft(ns), Netfilter(ns))
    nf.sync(True, views, set())
    _in(ns, switch.format("iptables", ns))
    assert "corral" not in nft_text(ns, "tables")
    nf.forget_kernel()
    nf.sync(True, views, set())
    _in(ns, switch.format("ebpf", ns))  # the eBPF mode keeps iptables rules, not nftables
    assert "corral" not in nft_text(ns, "tables")


# ---------------------------------------------------------------- the data path

SERVER = r"""
import socket, sys, threading
name, ip = sys.argv[1], sys.argv[2]
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((ip, 5353))
    while True:
        d, a = s.recvfrom(100); s.sendto(f"{name} {a[0]}".encode(), a)
threading.Thread(target=udp, daemon=True).start()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, 8080)); s.listen(128); print("up", flush=True)
while True:
    c, a = s.accept(); c.sendall(f"{name} {a[0]}".encode()); c.close()
"""

CLIENT = r"""
import errno, json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); out.append(s.recv(100).decode())
    except OSError as e:
        out.append("ERR:" + errno.errorcode.get(e.errno or 0, type(e).__name__))
    s.close()
print(json.dumps(out))
"""

GW = "10.244.1.1"


def ip(ns: str, *argv: str) -> None:
    netns.run(ns, ["ip", *argv])


@contextlib.contextmanager
def routed_node(node: str, pods: int) -> Iterator[list[tuple[str, str]]]:
    """Pods as namespaces on /32 routes via veths (the node owns GW on each veth):
    every packet between two pods is routed by the node, so it passes its hooks."""
    made: list[tuple[str, str]] = []
    procs: list[subprocess.Popen[str]] = []
    with contextlib.ExitStack() as stack:
        netns.run(node, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        ip(node, "link", "set", "lo", "up")
        for i in range(pods):
            pod = stack.enter_context(scratch_netns("nftpod"))
            addr = f"10.244.1.{i + 2}"
            ip(node, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
               "netns", netns.path(pod))  # fmt: skip
            ip(node, "addr", "add", f"{GW}/32", "dev", f"v{i}")
            ip(node, "link", "set", f"v{i}", "up")
            ip(node, "route", "add", f"{addr}/32", "dev", f"v{i}")
            ip(pod, "link", "set", "lo", "up")
            ip(pod, "addr", "add", f"{addr}/32", "dev", "eth0")
            ip(pod, "link", "set", "eth0", "up")
            ip(pod, "route", "add", GW, "dev", "eth0")
            ip(pod, "route", "add", "default", "via", GW)
            made.append((pod, addr))
        ip(node, "route", "add", "10.96.0.0/12", "dev", "v0")  # the service CIDR's route
        try:
            for i, (pod, addr) in enumerate(made[1:], 1):
                argv = [sys.executable, "-c", SERVER, f"pod{i}", addr]
                p = subprocess.Popen(netns.command(pod, argv), stdout=subprocess.PIPE, text=True)
                procs.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "up"
            yield made
        finally:
            for p in procs:
                p.kill()
                p.wait()


def connect(ns: str, host: str, port: int, n: int) -> list[str]:
    return json.loads(_in(ns, CLIENT.replace("sys.argv[1], int(sys.argv[2]), int(sys.argv[3])",
                                             f"{host!r}, {port}, {n}")))  # fmt: skip


@needs_root
def test_data_path(scratch_ns: str) -> None:
    node = scratch_ns
    with routed_node(node, 3) as pods:
        client, (pod1, ip1), (_pod2, ip2) = pods[0], pods[1], pods[2]
        mode = NftablesMode(CIDR, node, Nft(node), Netfilter(node))
        a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80, node_port=30001)
        none = ServicePort("default/none", "", "TCP", "10.96.0.3", 80)
        self_ = ServicePort("default/self", "", "TCP", "10.96.0.4", 80)
        views = {"default/a": view(a, [ip1, ip2]), "default/none": view(none, []),
                 "default/self": view(self_, [ip1])}  # fmt: skip
        mode.sync(True, views, set())
        # ClusterIP: spread over both, the backend sees the client pod's own address
        got = connect(client[0], "10.96.0.1", 80, 40)
        names = Counter(g.split()[0] for g in got)
        assert set(names) == {"pod1", "pod2"}, got
        assert {g.split()[1] for g in got} == {client[1]}
        # no endpoints: refused at once (a TCP reset)
        assert connect(client[0], "10.96.0.3", 80, 2) == ["ERR:ECONNREFUSED"] * 2
        # hairpin: pod1 reaches itself through its service (masqueraded to the node)
        assert connect(pod1, "10.96.0.4", 80, 3) == [f"pod1 {GW}"] * 3
        # ... and only then: reaching the other endpoint, pod2 sees pod1's own address
        seen = {tuple(g.split()) for g in connect(pod1, "10.96.0.1", 80, 30)}
        assert seen == {("pod1", GW), ("pod2", ip1)}, seen
        # NodePort on the node's address, from a pod: masqueraded, load-balanced
        got = connect(client[0], GW, 30001, 30)
        assert {g.split()[1] for g in got} == {GW} and len({g.split()[0] for g in got}) == 2
        # the node's own connection to the VIP (nat output)
        assert all(g.startswith("pod") for g in connect(node, "10.96.0.1", 80, 4))
        # ClientIP affinity: one client sticks; when its endpoint goes it moves and sticks
        a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80, node_port=30001,
                        affinity_timeout=60)  # fmt: skip
        views["default/a"] = view(a, [ip1, ip2])
        mode.sync(False, views, {"default/a"})
        first = {g.split()[0] for g in connect(client[0], "10.96.0.1", 80, 15)}
        assert len(first) == 1, first
        stuck = first.pop()
        views["default/a"] = view(a, [ip2] if stuck == "pod1" else [ip1])
        mode.sync(False, views, {"default/a"})
        moved = {g.split()[0] for g in connect(client[0], "10.96.0.1", 80, 10)}
        assert len(moved) == 1 and stuck not in moved, moved
        # the endpoint back: the client stays where it is now
        views["default/a"] = view(a, [ip1, ip2])
        mode.sync(False, views, {"default/a"})
        assert {g.split()[0] for g in connect(client[0], "10.96.0.1", 80, 15)} == moved
        wait_for(lambda: mode.canary_ok(), "the canary")
        mode.cleanup()
