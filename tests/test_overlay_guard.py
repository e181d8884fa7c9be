"""What a pod cannot do to the overlay, on both datapaths (docs/overlay.md, "What a pod cannot do").

node-1 runs the eBPF fast path (`--datapath bpf`), node-2 the kernel's path
(`--datapath kernel`); every attack is made from (or against) each of them in
turn. A "stranger" namespace sits on the underlay switch like a node, without
a lease. Each attack is checked end to end: a listener in the target pod records
every datagram it gets, the attack is sent, then ordinary datagrams from a
legitimate pod until one arrives; the attack must not be among what arrived, and
the node's drop counter in datapath.json must have risen.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from corral.cluster.etcd import LocalEtcd
from corral.node import iptables, netlink, netns, podguard
from corral.node.podveth import pod_alias
from corral.overlay import guard
from tests.overlay_helpers import NEEDS_ROOT_AND_BCC, etcd_do, pod
from tests.overlay_testbed import Pod, SimNode, Testbed, wait_for

pytestmark = NEEDS_ROOT_AND_BCC

DEADLINE = 45.0
FAST, KERNEL = 1, 2
NODES = pytest.mark.parametrize("x", [FAST, KERNEL], ids=["fast", "kernel"])
PORT = 7301


def other(i: int) -> int:
    return KERNEL if i == FAST else FAST


@pytest.fixture(scope="module")
def bed(etcd: LocalEtcd) -> Iterator[Testbed]:
    etcd_do(etcd.url, lambda s: s.delete_prefix_raw("/corral/"))
    # Tests here stop an agent for as long as their attacks take; a short lease would
    # expire meanwhile and the other node would stop taking the stopped one's traffic.
    tb = Testbed(etcd.url, nodes=2, lease_ttl=30)
    try:
        tb.start_agent(FAST, wait=False, extra=["--datapath", "bpf"])
        tb.start_agent(KERNEL, wait=False, extra=["--datapath", "kernel"])
        for i in (FAST, KERNEL):
            tb.wait_ready(i)
            tb.add_pod(i)  # .2: the attacker
            tb.add_pod(i)  # .3: its neighbour
        tb.wait_fastpath(FAST)
        for i in (FAST, KERNEL):
            wait_for(lambda i=i: guarded(tb, i), DEADLINE, f"node-{i}'s pods to be guarded")
        wait_for(lambda: tb.ping(pod(tb, FAST), pod(tb, KERNEL).ip), DEADLINE, "pods to talk")
        yield tb
    finally:
        tb.close()
        etcd_do(etcd.url, lambda s: s.delete_prefix_raw("/corral/"))


@pytest.fixture(scope="module")
def stranger(bed: Testbed) -> SimNode:
    """A namespace on the underlay switch that holds no lease (no agent runs there)."""
    return bed.add_node(9)


def guarded(tb: Testbed, i: int) -> bool:
    saved = podguard.read(tb.node(i).ns)
    return all(f"{podguard.POD_CHAIN_PREFIX}v{p.name}" in saved.chains for p in tb.node(i).pods)


def datapath_file(tb: Testbed, i: int) -> dict[str, Any]:
    with open(os.path.join(tb.node(i).run_dir, "datapath.json")) as f:
        return json.load(f)


def dropped(tb: Testbed, i: int, what: str) -> int:
    """Node i's own datapath's count of `what`, as the agent last wrote it (every full pass).

    The fast node's count is its programs' (so the fast path itself dropped it,
    not the kernel's guard behind it), the kernel node's its rules'.
    """
    doc = datapath_file(tb, i).get("dropped", {})
    return int(doc.get("bpf" if i == FAST else "kernel", {}).get(what, 0))


def vtep_mac(tb: Testbed, i: int) -> str:
    with open(os.path.join(tb.node(i).state_dir, "overlay.json")) as f:
        return str(json.load(f)["vtepMAC"])


def ifindex(tb: Testbed, i: int, p: Pod) -> int:
    with netlink.iproute(tb.node(i).ns) as ipr:
        return int(ipr.link_lookup(ifname=f"v{p.name}")[0])


def gateway(tb: Testbed, i: int) -> str:
    info = tb.node(i).subnet_info()
    assert info is not None
    return str(ipaddress.ip_network(info["subnet"]).network_address + 1)


LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65535)
    print(addr[0], data.decode(errors="replace"), flush=True)
"""

SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if sys.argv[4] != "-":
    s.bind((sys.argv[4], 0))
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""

# A VXLAN packet (VNI 1) carrying UDP to argv[4]:argv[5] from argv[3], sent from a
# plain UDP socket to each argv[1] (comma-separated) on the VXLAN port argv[2].
FORGE = """
import socket, sys
from scapy.all import IP, UDP, VXLAN, Ether
targets, port, inner_src, inner_dst, dport, mac, tag = sys.argv[1:8]
inner = Ether(dst=mac, src="02:00:00:00:00:01") / IP(src=inner_src, dst=inner_dst, ttl=64)
inner = inner / UDP(sport=4242, dport=int(dport)) / tag.encode()
payload = bytes(VXLAN(vni=1, flags=0x08) / inner)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for t in targets.split(","):
    for _ in range(3):
        s.sendto(payload, (t, int(port)))
"""

# A frame from the pod's eth0 with a MAC that is not its own (argv[1]: to, argv[2]: port).
MAC_SPOOF = """
import sys
from scapy.all import IP, UDP, Ether, get_if_addr, getmacbyip, sendp
gw = getmacbyip(sys.argv[3])
pkt = Ether(src="02:00:00:00:00:99", dst=gw) / IP(src=get_if_addr("eth0"), dst=sys.argv[1])
sendp(pkt / UDP(sport=4243, dport=int(sys.argv[2])) / b"macspoof", iface="eth0", count=3, verbose=0)
"""


class Listener:
    """A UDP listener in a pod that records (source, payload) of everything it receives."""

    def __init__(self, tb: Testbed, p: Pod, port: int = PORT) -> None:
        self.tb, self.pod, self.port = tb, p, port
        self.out = tempfile.NamedTemporaryFile("w+", prefix="corral-guard-", suffix=".log")  # noqa: SIM115
        self.proc = tb.popen(p.ns, [sys.executable, "-c", LISTEN, str(port)], stdout=self.out)
        wait_for(
            lambda: f":{port}" in tb.run(p.ns, ["ss", "-lun"]).stdout, DEADLINE, "the listener"
        )

    def got(self) -> list[tuple[str, str]]:
        with open(self.out.name) as f:
            return [tuple(line.split(" ", 1)) for line in f.read().splitlines() if " " in line]  # type: ignore[misc]

    def flush_with(self, src: Pod, tag: str) -> list[tuple[str, str]]:
        """Send `tag` from a legitimate pod until it arrives; all that arrived by then."""

        def arrived() -> bool:
            send(self.tb, src, self.pod.ip, self.port, tag)
            return any(t == tag for _, t in self.got())

        wait_for(arrived, DEADLINE, f"{tag} from {src.ip} to arrive", interval=0.2)
        return self.got()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.out.close()


def send(tb: Testbed, src: Pod | str, dst: str, port: int, tag: str, bind: str = "-") -> None:
    ns = src.ns if isinstance(src, Pod) else src
    tb.run(ns, [sys.executable, "-c", SEND, dst, str(port), tag, bind], check=False)


@contextlib.contextmanager
def listeners(bed: Testbed) -> Iterator[Any]:
    """A factory of Listeners, all closed on the way out."""
    made: list[Listener] = []

    def make(p: Pod) -> Listener:
        made.append(Listener(bed, p))
        return made[-1]

    try:
        yield make
    finally:
        for ln in made:
            ln.close()


@pytest.fixture
def listen(bed: Testbed) -> Iterator[Any]:
    with listeners(bed) as make:
        yield make


def wait_dropped(tb: Testbed, i: int, what: str, more_than: int) -> None:
    wait_for(
        lambda: dropped(tb, i, what) > more_than,
        DEADLINE,
        f"node-{i}'s datapath.json to count {what} drops",
    )


# ------------------------------------------------------------ ordinary traffic


@NODES
def test_ordinary_traffic_still_flows(bed: Testbed, x: int, listen: Any) -> None:
    a, neighbour = bed.node(x).pods[:2]
    far = pod(bed, other(x))
    ln = listen(far)
    seen = ln.flush_with(a, "hello")
    assert (a.ip, "hello") in seen  # across nodes, with the pod's own source
    assert bed.ping(a, neighbour.ip) and bed.ping(neighbour, far.ip)  # within a node, and back
    assert bed.ping(far, a.ip)


def test_guard_state_is_there_and_idempotent(bed: Testbed) -> None:
    for i in (FAST, KERNEL):
        ns = bed.node(i).ns
        with netlink.iproute(ns) as ipr:
            pods = podguard.pods_from_links(ipr.get_links())
        assert {p.ip for p in pods.values()} == {p.ip for p in bed.node(i).pods}
        assert podguard.sync(ns, pods) == []  # nothing left to change
        info = bed.node(i).subnet_info()
        assert info is not None
        peers = {bed.node(other(i)).ip}
        assert guard.ensure(ns, info["network"], 4789, peers) == []
        rules = iptables.chain_rules(ns, "raw", guard.CHAIN)
        assert rules is not None and guard.peer_rule(bed.node(other(i)).ip, 4789) in rules
    doc = datapath_file(bed, KERNEL)
    assert set(doc["dropped"]) >= {"spoofed", "vxlan_from_pods", "vxlan_foreign", "kernel"}
    assert "bpf" in datapath_file(bed, FAST)["dropped"]


# ------------------------------------------------------------ VXLAN from pods


@NODES
def test_a_pod_cannot_inject_into_the_overlay(bed: Testbed, x: int, listen: Any) -> None:
    """Forged VXLAN from a pod: to the other node, to its own node, by any of their addresses."""
    attacker = pod(bed, x)
    y = other(x)
    victim = pod(bed, y)
    ln = listen(victim)
    before = dropped(bed, x, "vxlan_from_pods")
    targets = [bed.node(y).ip, bed.node(x).ip, gateway(bed, x), gateway(bed, y)]
    forge = [",".join(targets), "4789", pod(bed, x).ip, victim.ip, str(PORT), vtep_mac(bed, y)]
    bed.run(attacker.ns, [sys.executable, "-c", FORGE, *forge, "forged"])
    # the same through the attacker's own node, whose VTEP would hand it on
    forge[5] = vtep_mac(bed, x)
    bed.run(attacker.ns, [sys.executable, "-c", FORGE, *forge, "forged"])
    seen = ln.flush_with(bed.node(x).pods[1], "after-forged")
    assert not [s for s in seen if s[1] == "forged"], seen
    wait_dropped(bed, x, "vxlan_from_pods", before + 2 * 3 * len(targets) - 1)


VIP = "10.96.0.99"


def dnat_to_vxlan(tb: Testbed, x: int, op: str) -> None:
    """A service-shaped DNAT in node x: VIP:9999/udp -> the other node's VXLAN port."""
    rule = ["PREROUTING", "-d", VIP, "-p", "udp", "--dport", "9999", "-j", "DNAT"]
    rule += ["--to-destination", f"{tb.node(other(x)).ip}:4789"]
    iptables.run(tb.node(x).ns, ["iptables", "-t", "nat", op, *rule])


@NODES
def test_a_pod_cannot_reach_a_vxlan_port_through_a_dnat(bed: Testbed, x: int, listen: Any) -> None:
    """After the DNAT, masquerade would make the packet the node's own: dropped before that."""
    attacker, neighbour = bed.node(x).pods[:2]
    victim = pod(bed, other(x))
    ln = listen(victim)
    before = datapath_file(bed, x)["dropped"]["kernel"]["vxlan_from_pods"]
    dnat_to_vxlan(bed, x, "-A")
    try:
        forge = [VIP, "9999", attacker.ip, victim.ip, str(PORT), vtep_mac(bed, other(x))]
        bed.run(attacker.ns, [sys.executable, "-c", FORGE, *forge, "dnat-forged"])
        seen = ln.flush_with(neighbour, "after-dnat")
    finally:
        dnat_to_vxlan(bed, x, "-D")
    assert not [s for s in seen if s[1] == "dnat-forged"], seen
    wait_for(
        lambda: datapath_file(bed, x)["dropped"]["kernel"]["vxlan_from_pods"] >= before + 3,
        DEADLINE,
        "the filter rule to count the DNATed packets",
    )


# ------------------------------------------------------------ VXLAN from strangers


@NODES
def test_vxlan_from_a_host_that_is_no_peer_is_dropped(
    bed: Testbed, x: int, stranger: SimNode, listen: Any
) -> None:
    victim = pod(bed, x)
    ln = listen(victim)
    before = dropped(bed, x, "vxlan_foreign")
    # looks like the other node's pod talking, but comes from the stranger's address
    forge = [bed.node(x).ip, "4789", pod(bed, other(x)).ip, victim.ip, str(PORT)]
    forge += [vtep_mac(bed, x), "foreign"]
    bed.run(stranger.ns, [sys.executable, "-c", FORGE, *forge])
    seen = ln.flush_with(pod(bed, other(x)), "after-foreign")
    assert not [s for s in seen if s[1] == "foreign"], seen
    wait_dropped(bed, x, "vxlan_foreign", before + 2)


# ------------------------------------------------------------ spoofed sources


@NODES
def test_a_pod_cannot_send_from_another_pods_address(bed: Testbed, x: int, listen: Any) -> None:
    attacker, neighbour = bed.node(x).pods[:2]
    far, target = bed.node(other(x)).pods[:2]
    ln = listen(target)
    before = dropped(bed, x, "spoofed")
    for spoofed in (neighbour.ip, far.ip):  # a pod of its own node, one of the other's
        bed.run(attacker.ns, ["ip", "addr", "add", f"{spoofed}/32", "dev", "eth0"])
        try:
            send(bed, attacker, target.ip, PORT, "spoofed", bind=spoofed)
            r = bed.run(
                attacker.ns, ["ping", "-c", "2", "-W", "1", "-I", spoofed, target.ip], False
            )
            assert r.returncode != 0, r.stdout
        finally:
            bed.run(attacker.ns, ["ip", "addr", "del", f"{spoofed}/32", "dev", "eth0"], False)
    seen = ln.flush_with(attacker, "after-spoofed")  # its own address still works
    assert not [s for s in seen if s[1] == "spoofed" or s[0] in (neighbour.ip, far.ip)], seen
    wait_dropped(bed, x, "spoofed", before)


@NODES
def test_a_pod_cannot_send_from_another_mac(bed: Testbed, x: int, listen: Any) -> None:
    attacker = pod(bed, x)
    far = pod(bed, other(x))
    ln = listen(far)
    before = dropped(bed, x, "spoofed")
    bed.run(attacker.ns, [sys.executable, "-c", MAC_SPOOF, far.ip, str(PORT), gateway(bed, x)])
    seen = ln.flush_with(attacker, "after-macspoof")
    assert not [s for s in seen if s[1] == "macspoof"], seen
    wait_dropped(bed, x, "spoofed", before + 2)


@NODES
def test_a_pod_cannot_poison_its_nodes_arp(bed: Testbed, x: int) -> None:
    attacker, neighbour = bed.node(x).pods[:2]
    node = bed.node(x)
    assert bed.ping(node.ns, neighbour.ip)  # the node has a neighbour entry for it

    def mac_of(ip: str) -> str | None:
        with netlink.iproute(node.ns) as ipr:
            for n in ipr.get_neighbours(family=2, dst=ip):
                return str(n.get_attr("NDA_LLADDR"))
        return None

    honest = mac_of(neighbour.ip)
    script = (
        "from scapy.all import ARP, Ether, get_if_hwaddr, sendp; import sys\n"
        "me = get_if_hwaddr('eth0')\n"
        "p = Ether(src=me, dst='ff:ff:ff:ff:ff:ff') / ARP(op=2, hwsrc=me, psrc=sys.argv[1],"
        " hwdst='ff:ff:ff:ff:ff:ff', pdst=sys.argv[2])\n"
        "sendp(p, iface='eth0', count=3, verbose=0)\n"
    )
    before = dropped(bed, x, "spoofed")
    bed.run(attacker.ns, [sys.executable, "-c", script, neighbour.ip, gateway(bed, x)])
    wait_dropped(bed, x, "spoofed", before + 2)
    assert mac_of(neighbour.ip) == honest


# ------------------------------------------------------------ the opt-in


@NODES
def test_extra_source_prefix_is_an_explicit_opt_in(bed: Testbed, x: int, listen: Any) -> None:
    info = bed.node(x).subnet_info()
    assert info is not None
    extra = str(list(ipaddress.ip_network(info["subnet"]).subnets(new_prefix=25))[1])
    client = bed.add_pod(x, host=100, extra_source=extra)
    try:
        wait_for(lambda: guarded(bed, x), DEADLINE, "the client pod to be guarded")
        if x == FAST:
            wait_for(
                lambda: (
                    f"fast path: ifindex {ifindex(bed, x, client)} may send only from"
                    in bed.agent_log(FAST)
                ),
                DEADLINE,
                "the fast path to know the client's sources",
            )
        far = pod(bed, other(x))
        ln = listen(far)
        allowed = str(ipaddress.ip_network(extra).network_address + 7)
        bed.run(client.ns, ["ip", "addr", "add", f"{allowed}/32", "dev", "eth0"])
        # in the prefix: allowed; outside it (the attacker pod's address): not
        bed.run(client.ns, ["ip", "addr", "add", f"{pod(bed, x).ip}/32", "dev", "eth0"])

        def through() -> bool:
            send(bed, client, far.ip, PORT, "extra", bind=allowed)
            return any(s == (allowed, "extra") for s in ln.got())

        wait_for(through, DEADLINE, "a datagram from the extra address", interval=0.2)
        send(bed, client, far.ip, PORT, "outside", bind=pod(bed, x).ip)
        seen = ln.flush_with(client, "after-extra")
        assert not [s for s in seen if s[1] == "outside"], seen
    finally:
        netns.remove(client.ns)
        bed.node(x).pods.remove(client)


# ------------------------------------------------------------ kernel state, repaired


@NODES
def test_flushed_guards_come_back(bed: Testbed, x: int) -> None:
    ns = bed.node(x).ns
    veth = f"v{pod(bed, x).name}"
    iptables.run(ns, ["iptables", "-t", "raw", "-F", guard.CHAIN])
    iptables.run(ns, ["iptables", "-t", "raw", "-D", "PREROUTING", *guard.JUMP])
    netns.run(ns, ["ebtables", "-t", "nat", "-F", podguard.POD_CHAIN_PREFIX + veth])
    netns.run(ns, ["ebtables", "-t", "nat", "-D", "PREROUTING", "-j", podguard.CHAIN])

    def back() -> bool:
        saved = podguard.read(ns)
        rules = iptables.chain_rules(ns, "raw", guard.CHAIN) or []
        return (
            f"-j {podguard.CHAIN}" in saved.rules.get("PREROUTING", [])
            and bool(saved.rules.get(podguard.POD_CHAIN_PREFIX + veth))
            and guard.peer_rule(bed.node(other(x)).ip, 4789) in rules
            and iptables.has_rule(ns, "raw", "PREROUTING", guard.JUMP)
        )

    wait_for(back, DEADLINE, "the periodic pass to restore the guards")
    assert bed.ping(pod(bed, x), pod(bed, other(x)).ip)


@NODES
def test_a_restarted_agent_keeps_the_protections(bed: Testbed, x: int, listen: Any) -> None:
    """The guards are kernel state: they hold while the agent is down and after it is back."""
    loads = bed.agent_log(x).count("eBPF fast path on")
    readies = bed.agent_log(x).count("overlay ready")
    bed.stop_agent(x, signal.SIGKILL)
    try:
        attacker, neighbour = bed.node(x).pods[:2]
        far = pod(bed, other(x))
        ln = listen(far)
        bed.run(attacker.ns, ["ip", "addr", "add", f"{neighbour.ip}/32", "dev", "eth0"])
        try:
            send(bed, attacker, far.ip, PORT, "spoofed-while-down", bind=neighbour.ip)
        finally:
            bed.run(attacker.ns, ["ip", "addr", "del", f"{neighbour.ip}/32", "dev", "eth0"])
        forge = [bed.node(other(x)).ip, "4789", attacker.ip, far.ip, str(PORT)]
        forge += [vtep_mac(bed, other(x)), "forged-while-down"]
        bed.run(attacker.ns, [sys.executable, "-c", FORGE, *forge])
        seen = ln.flush_with(neighbour, "after-down")
        assert not [s for s in seen if s[1].endswith("-while-down")], seen
    finally:
        extra = ["--datapath", "bpf" if x == FAST else "kernel"]
        bed.start_agent(x, wait=False, extra=extra)
        wait_for(
            lambda: bed.agent_log(x).count("overlay ready") > readies, DEADLINE, "the agent back"
        )
        if x == FAST:
            bed.wait_fastpath(x, runs=loads + 1)
    if x == FAST:
        # the fresh programs got their peers and sources before they went on: ordinary
        # traffic both ways, and nothing dropped by mistake (their counters start at 0)
        for _ in range(3):
            assert bed.ping(pod(bed, FAST), pod(bed, KERNEL).ip)
            assert bed.ping(pod(bed, KERNEL), bed.node(FAST).pods[1].ip)
        wait_for(
            lambda: datapath_file(bed, FAST)["packets"]["encapsulated"] >= 6,
            DEADLINE,
            "datapath.json to count the fresh programs' packets",
        )
        drops = datapath_file(bed, FAST)["dropped"]["bpf"]
        assert drops["spoofed"] == drops["vxlan_foreign"] == drops["vxlan_from_pods"] == 0, drops
    test_a_pod_cannot_send_from_another_pods_address(bed, x, listen)


def test_alias_with_an_extra_source_still_names_the_pod() -> None:
    from corral.node.podveth import parse_pod_alias, pod_extra_source

    a = pod_alias("10.244.1.5", "02:AA:bb:cc:dd:ee", "10.244.1.128/25")
    assert a == "corral-pod 10.244.1.5 02:aa:bb:cc:dd:ee 10.244.1.128/25"
    assert parse_pod_alias(a) == ("10.244.1.5", "02:aa:bb:cc:dd:ee")
    assert pod_extra_source(a) == "10.244.1.128/25"
    assert pod_extra_source(pod_alias("10.244.1.5", "02:aa:bb:cc:dd:ee")) is None
    assert parse_pod_alias("corral-pod 10.244.1.5 02:aa:bb:cc:dd:ee nonsense") is None
    rules = podguard.pod_rules(podguard.PodSource("veth0", "10.244.1.5", "02:AA:bb:cc:dd:ee"))
    assert rules[0] == "-p IPv4 -s 02:aa:bb:cc:dd:ee --ip-src 10.244.1.5 -j RETURN"
    assert rules[-3:] == ["-p IPv4 -j DROP", "-p ARP -j DROP", "-j DROP"]


def test_without_the_guards_the_attacks_would_work(bed: Testbed, listen: Any) -> None:
    """The control: with the kernel node's guards taken away (agent stopped), both attacks
    get through, so the tests above would see them; the agent back, they are blocked again."""
    x = KERNEL
    ns = bed.node(x).ns
    attacker, neighbour = bed.node(x).pods[:2]
    target = bed.node(FAST).pods[1]
    readies = bed.agent_log(x).count("overlay ready")
    bed.stop_agent(x)
    try:
        iptables.remove_chain(ns, "raw", guard.CHAIN, {"PREROUTING": guard.JUMP})
        hooks = dict.fromkeys(guard.FILTER_HOOKS, guard.FILTER_JUMP)
        iptables.remove_chain(ns, "filter", guard.FILTER_CHAIN, hooks)
        podguard.remove(ns)
        dnat_to_vxlan(bed, x, "-A")
        ln = Listener(bed, target)
        # to its own node's VXLAN socket, which decapsulates and routes the inner packet on
        # (to the other node's: the packet skips conntrack, so it is not masqueraded and
        # the other node's guard drops it as not from a peer)
        forge = [gateway(bed, x), "4789", attacker.ip, target.ip, str(PORT)]
        forge += [vtep_mac(bed, x), "forged-unguarded"]
        # through a DNAT, masquerade makes it the node's own packet, from a peer
        dnat = [VIP, "9999", attacker.ip, target.ip, str(PORT), vtep_mac(bed, FAST)]
        dnat += ["dnat-unguarded"]
        bed.run(attacker.ns, ["ip", "addr", "add", f"{neighbour.ip}/32", "dev", "eth0"])
        try:

            def through() -> bool:
                bed.run(attacker.ns, [sys.executable, "-c", FORGE, *forge])
                bed.run(attacker.ns, [sys.executable, "-c", FORGE, *dnat])
                send(bed, attacker, target.ip, PORT, "spoofed-unguarded", bind=neighbour.ip)
                got = {t for _, t in ln.got()}
                return {"forged-unguarded", "dnat-unguarded", "spoofed-unguarded"} <= got

            try:
                wait_for(through, DEADLINE, "the attacks to get through unguarded", interval=0.5)
            except AssertionError as e:
                raise AssertionError(f"{e}; got {ln.got()}") from None
        finally:
            ln.close()
            bed.run(attacker.ns, ["ip", "addr", "del", f"{neighbour.ip}/32", "dev", "eth0"])
            dnat_to_vxlan(bed, x, "-D")
    finally:
        bed.start_agent(x, wait=False, extra=["--datapath", "kernel"])
        wait_for(
            lambda: bed.agent_log(x).count("overlay ready") > readies, DEADLINE, "the agent back"
        )
    wait_for(lambda: guarded(bed, x), DEADLINE, "the guards back")
    for check in (
        test_a_pod_cannot_inject_into_the_overlay,
        test_a_pod_cannot_reach_a_vxlan_port_through_a_dnat,
        test_a_pod_cannot_send_from_another_pods_address,
    ):
        with listeners(bed) as make:
            check(bed, x, make)
