"""The eBPF proxy's socket programs (ebpf/proxy_sock.c + .py) against the real kernel.

One load for the module, attached to a cgroup2 directory made for this run
(never the root), clients started inside it (or outside, to see they are left
alone) in a network namespace made for it, whose loopback carries three TCP
backends and three UDP backends on 127.0.0.1 that answer with their own port.
Pins of the test node and the cgroup go in finalizers.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from corral.ebpf import loader, pod_cgroups, proxy_sock
from corral.ebpf.pinned_map import LRU_HASH, BpfMap, MapSpec, ip_key
from corral.ebpf.proxy_sock import Entry, SockLB
from corral.node import netns
from corral.proxy.core import EndpointInfo, ServicePort, ServiceView
from tests.answer_helpers import answering_netns
from tests.overlay_helpers import NEEDS_ROOT_AND_BCC

pytestmark = NEEDS_ROOT_AND_BCC

RUN = uuid.uuid4().hex[:8]
NODE = f"test-{RUN}"
VIP, NONE_VIP = "10.96.201.1", "10.96.201.2"
TCP_PORTS, UDP_PORTS = (9001, 9002, 9003), (5301, 5302, 5303)
BACKENDS = tuple(("127.0.0.1", p) for p in TCP_PORTS)
UDP_BACKENDS = tuple(("127.0.0.1", p) for p in UDP_PORTS)

# argv: JSON list of [op, ...]; prints a JSON list of results ("ERR:<errno name>")
CLIENT = r"""
import errno, json, socket, sys, threading
def err(e): return "ERR:" + errno.errorcode.get(e.errno or 0, type(e).__name__)
def tcp(host, port, src=None):
    s = socket.socket(); s.settimeout(3)
    try:
        if src: s.bind((src, 0))
        s.connect((host, port)); peer = s.getpeername(); got = s.recv(16).decode()
        return f"{got} {peer[0]}:{peer[1]}"
    except OSError as e: return err(e)
    finally: s.close()
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    try:
        s.sendto(b"hi", (host, port)); d, a = s.recvfrom(100)
        return f"{d.decode()} {a[0]}:{a[1]}"
    except OSError as e: return err(e)
    finally: s.close()
def burst(host, port, src, n):  # n connections of one client at once, on both CPUs
    out = [None] * n
    def one(i): out[i] = tcp(host, port, src)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return out
out = []
for op in json.loads(sys.argv[1]):
    out.append({"tcp": tcp, "udp": udp, "burst": burst}[op[0]](*op[1:]))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    with answering_netns(f"corral-test-sock-{RUN}", TCP_PORTS, UDP_PORTS) as path:
        yield path


@pytest.fixture(scope="module")
def cgroup() -> Iterator[str]:
    path = os.path.join(loader.CGROUP2_ROOT, f"corral-test-{RUN}")
    os.mkdir(path)
    try:
        yield path
    finally:
        proxy_sock.remove_all(NODE, path)
        for d in sorted((os.path.join(path, n) for n in os.listdir(path)), reverse=True):
            if os.path.isdir(d):
                os.rmdir(d)
        os.rmdir(path)
        loader.remove_pins(NODE)


@pytest.fixture(scope="module")
def lb(cgroup: str) -> Iterator[SockLB]:
    s = SockLB(NODE, cgroup=cgroup)
    s.load()
    assert s.attach() == dict.fromkeys(proxy_sock.PROGRAMS, "attached")
    try:
        yield s
    finally:
        s.close()


def run(ns: str, cgroup: str | None, *ops: list) -> list:
    def join() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:  # type: ignore[arg-type]
            f.write(str(os.getpid()))

    out = subprocess.run(
        netns.command(ns, [sys.executable, "-c", CLIENT, json.dumps(list(ops))]),
        preexec_fn=join if cgroup else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


def port_of(answer: str) -> int:
    return int(answer.split()[0])


def view(vip: str, backends: tuple, affinity: int | None = None) -> ServiceView:
    sp = ServicePort("default/web", "http", "TCP", vip, 80, affinity_timeout=affinity)
    eps = tuple(EndpointInfo(ip, port) for ip, port in backends)
    return ServiceView((sp,), ((sp.key, eps),) if eps else ())


def web(backends: tuple, affinity: int | None = None, vip: str = VIP) -> dict:
    """The socket programs' records of a one-port TCP service default/web."""
    return {"default/web": {(vip, 80, "TCP"): Entry(tuple(sorted(backends)), affinity)}}


def test_entries_from_views() -> None:
    """The proxy's conversion of its views into the records SockLB takes."""
    from corral.proxy.ebpf import sock_entries

    sp = ServicePort("ns/a", "", "UDP", "10.96.0.9", 53)
    sctp = ServicePort("ns/a", "s", "SCTP", "10.96.0.9", 99)
    v = ServiceView(
        (sp, sctp),
        (
            (
                sp.key,
                (EndpointInfo("10.244.1.2", 5353), EndpointInfo("10.244.1.3", 5353, ready=False)),
            ),
        ),
    )
    assert sock_entries({"ns/a": v}, ["ns/a", "ns/gone"]) == {
        "ns/a": {("10.96.0.9", 53, "UDP"): Entry((("10.244.1.2", 5353),))},
        "ns/gone": {},
    }


def test_spread_peer_name_and_outside_the_cgroup(lb: SockLB, ns: str, cgroup: str) -> None:
    assert lb.sync(web(BACKENDS), None) > 0
    answers = run(ns, cgroup, *[["tcp", VIP, 80]] * 60)
    assert not [a for a in answers if a.startswith("ERR")], answers
    counts = Counter(port_of(a) for a in answers)
    assert set(counts) == set(TCP_PORTS), counts  # every backend; 60 picks miss one ~1e-10
    # getpeername() shows the VIP, not the backend
    assert {a.split()[1] for a in answers} == {f"{VIP}:80"}
    # a process outside the node's cgroup is not redirected (no route to the VIP here)
    assert run(ns, None, ["tcp", VIP, 80])[0].startswith("ERR:")


def test_no_endpoints_refused_at_once_tcp_and_udp(lb: SockLB, ns: str, cgroup: str) -> None:
    refused = {(NONE_VIP, 80, "TCP"): Entry(()), (NONE_VIP, 53, "UDP"): Entry(())}
    lb.sync({"default/none": refused}, ["default/none"])
    assert run(ns, cgroup, ["tcp", NONE_VIP, 80], ["udp", NONE_VIP, 53]) == ["ERR:ECONNREFUSED"] * 2
    lb.sync({}, ["default/none"])
    assert all(k[0] != NONE_VIP for k in lb.read_kernel())


def test_unconnected_udp_per_datagram_and_reply_shows_the_vip(
    lb: SockLB, ns: str, cgroup: str
) -> None:
    lb.sync({"default/dns": {(VIP, 53, "UDP"): Entry(UDP_BACKENDS)}}, ["default/dns"])
    answers = run(ns, cgroup, *[["udp", VIP, 53]] * 30)
    assert {a.split()[1] for a in answers} == {f"{VIP}:53"}, answers
    assert len({port_of(a) for a in answers}) >= 2
    # a backend leaves: the next datagram already avoids it
    lb.sync({"default/dns": {(VIP, 53, "UDP"): Entry(UDP_BACKENDS[:1])}}, ["default/dns"])
    assert {port_of(a) for a in run(ns, cgroup, *[["udp", VIP, 53]] * 10)} == {UDP_PORTS[0]}
    lb.sync({}, ["default/dns"])


def _by_client(answers: list[str], n: int) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for i, a in enumerate(answers):
        out.setdefault(i % n, set()).add(port_of(a))
    return out


def test_affinity_200_clients_failover_timeout_and_switching(
    lb: SockLB, ns: str, cgroup: str
) -> None:
    srcs = [f"127.0.1.{i}" for i in range(1, 201)]
    views = web(BACKENDS, affinity=3600)
    lb.sync(views, ["default/web"])
    answers = run(ns, cgroup, *[["tcp", VIP, 80, s] for _ in range(3) for s in srcs])
    assert not [a for a in answers if a.startswith("ERR")]
    sticky = _by_client(answers, len(srcs))
    assert all(len(v) == 1 for v in sticky.values()), sticky
    spread = Counter(next(iter(v)) for v in sticky.values())
    assert set(spread) == set(TCP_PORTS), spread
    # a backend goes (NotReady or removed): its clients move at once and stick to the new one
    victim = spread.most_common(1)[0][0]
    mine = [srcs[i] for i, v in sticky.items() if next(iter(v)) == victim]
    lb.sync(web(tuple(b for b in BACKENDS if b[1] != victim), 3600), ["default/web"])
    moved = _by_client(run(ns, cgroup, *[["tcp", VIP, 80, s] for _ in range(2) for s in mine]),
                       len(mine))  # fmt: skip
    assert all(len(v) == 1 and victim not in v for v in moved.values()), moved
    # back, and the others kept theirs all along (their entries were still valid)
    lb.sync(views, ["default/web"])
    others = [s for s in srcs if s not in mine][:30]
    again = run(ns, cgroup, *[["tcp", VIP, 80, s] for s in others])
    assert [port_of(a) for a in again] == [next(iter(sticky[srcs.index(s)])) for s in others]
    # a short timeout: an idle client's entry expires and it is placed at random again
    lb.sync(web(BACKENDS, affinity=1), ["default/web"])
    first = [port_of(a) for a in run(ns, cgroup, *[["tcp", VIP, 80, s] for s in srcs[:30]])]
    time.sleep(2.5)
    later = [port_of(a) for a in run(ns, cgroup, *[["tcp", VIP, 80, s] for s in srcs[:30]])]
    assert first != later  # 30 fresh random picks all equal to the old ones: 3**-30
    # affinity off: one client spreads; on again: old entries are not honoured
    lb.sync(web(BACKENDS), ["default/web"])
    assert len({port_of(a) for a in run(ns, cgroup, *[["tcp", VIP, 80, srcs[0]]] * 30)}) >= 2
    lb.sync(views, ["default/web"])
    epochs = {h.epoch for k, h in lb.read_kernel().items() if k[0] == VIP and k[1] == 80}
    assert epochs and 0 not in epochs


def test_concurrent_connections_of_a_new_client_agree(lb: SockLB, ns: str, cgroup: str) -> None:
    """The CPU race: a client's first connections, made at once, all land on one backend."""
    lb.sync(web(BACKENDS, affinity=3600), ["default/web"])
    ops = [["burst", VIP, 80, f"127.0.2.{i}", 8] for i in range(1, 41)]
    for i, got in enumerate(run(ns, cgroup, *ops)):
        assert not [a for a in got if a.startswith("ERR")], got
        assert len({port_of(a) for a in got}) == 1, (i, got)


def test_pod_ip_from_the_runtime_keys_affinity(lb: SockLB, ns: str, cgroup: str) -> None:
    """Unbound sockets of two cgroups the runtime mapped to one pod IP share one entry."""
    a, b = os.path.join(cgroup, "pod-a"), os.path.join(cgroup, "pod-b")
    for d in (a, b):
        os.makedirs(d, exist_ok=True)
        pod_cgroups.set_ip(NODE, d, "10.244.9.9")
    assert pod_cgroups.lookup(NODE, a) == "10.244.9.9"
    lb.sync(web(BACKENDS, affinity=3600), ["default/web"])
    got = {port_of(x) for d in (a, b) for x in run(ns, d, *[["tcp", VIP, 80]] * 5)}
    assert len(got) == 1
    assert any(k.client == ip_key("10.244.9.9") for k in lb.maps["proxy_aff"])
    assert pod_cgroups.forget(NODE, a) and pod_cgroups.forget(NODE, b)
    assert pod_cgroups.lookup(NODE, a) is None


@pytest.mark.parametrize("first", ["run", "sync"])
def test_ebpf_mode_maps_at_once_iptables_rules_behind(
    lb: SockLB, ns: str, cgroup: str, first: str
) -> None:
    """EbpfMode: a sync programs the maps before returning; the DNAT rules follow on the
    iptables half's own runner, also when the sync came before the mode's loop ran."""
    from corral.proxy.ebpf import EbpfMode
    from corral.proxy.iptables import Netfilter

    name = os.path.basename(ns)
    mode = EbpfMode("10.244.0.0/16", NODE, sock=lb, netfilter=Netfilter(name))
    mode.loaded = mode.attached = True
    vip = VIP if first == "run" else "10.96.201.3"  # the maps outlive one case: its own VIP
    views = {"default/web": view(vip, BACKENDS)}

    async def go() -> None:
        loop = asyncio.get_running_loop()
        if first == "sync":
            result = await loop.run_in_executor(None, mode.sync, True, views, set(views))
        task = asyncio.create_task(mode.run(lambda: None))
        try:
            if first == "run":
                await asyncio.sleep(0.1)  # the mode's loop is running
                result = await loop.run_in_executor(None, mode.sync, True, views, set(views))
            assert result.lines > 0 and lb.have and (vip, 80, "TCP") in lb.have
            for _ in range(1200):
                if mode.rules_synced or mode.rules.failures:
                    break
                await asyncio.sleep(0.1)
            assert mode.rules_synced == 1 and mode.rules.failures == 0
        finally:
            task.cancel()

    asyncio.run(go())
    nat = subprocess.run(
        netns.command(name, ["iptables-save", "-t", "nat"]), capture_output=True, text=True
    ).stdout
    assert f"-d {vip}/32" in nat
    mode.iptables.cleanup()


def test_restart_reuses_pins_and_leaves_unchanged_services_alone(
    lb: SockLB, ns: str, cgroup: str
) -> None:
    lb.sync(web(BACKENDS), None)
    ids = {n: lb.map_id(n) for n in proxy_sock.MAPS}
    before = lb.read_kernel()
    again = SockLB(NODE, cgroup=cgroup)
    again.load()
    try:
        assert {n: again.map_id(n) for n in proxy_sock.MAPS} == ids
        assert again.read_kernel() == before
        assert again.sync(web(BACKENDS), None) == 0  # nothing to write
        assert again.attach() == dict.fromkeys(proxy_sock.PROGRAMS, "replaced")
        assert {port_of(a) for a in run(ns, cgroup, *[["tcp", VIP, 80]] * 20)} <= set(TCP_PORTS)
        mem = again.map_memory()
        assert set(mem) == {*proxy_sock.MAPS, "pod_cgroups"} and all(v > 0 for v in mem.values())
    finally:
        again.close()


def test_cleanup_detaches_and_unpins(lb: SockLB, cgroup: str) -> None:
    assert lb.attached_ok()
    done = proxy_sock.remove_all(NODE, cgroup)
    assert len(done) == len(proxy_sock.PROGRAMS) + len(proxy_sock.MAPS)
    assert loader.cgroup_programs(cgroup) == []
    assert not lb.attached_ok()
    assert set(loader.pinned(NODE)) <= {"pod_cgroups"}  # the runtime's map stays


def test_own_maps_of_an_older_layout_are_made_anew(cgroup: str) -> None:
    """An upgrade changed a proxy map's struct: the load unpins the old one and starts afresh."""
    node = f"{NODE}-old"
    path = os.path.join(loader.pin_dir(node), "proxy_rev")
    old = MapSpec("proxy_rev", LRU_HASH, ctypes.c_uint64, ctypes.c_uint32, 1024)
    with BpfMap.pinned(path, old) as m:
        m.put(1, 2)
        old_id = m.id
    s = SockLB(node, cgroup=cgroup)
    try:
        s.load()  # not attached: the module's load owns the cgroup
        assert s.map_id("proxy_rev") != old_id and len(s.maps["proxy_rev"]) == 0
        with BpfMap.open(path, proxy_sock.SPECS["proxy_rev"]) as now:  # type: ignore[union-attr]
            assert now.id == s.map_id("proxy_rev")
    finally:
        s.close()
        loader.remove_pins(node)
