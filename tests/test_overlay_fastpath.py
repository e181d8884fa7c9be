"""The eBPF fast path against the kernel's path, on two simulated nodes.

node-1's agent runs with the fast path (`--datapath bpf`), node-2's with the
kernel's path only (`--datapath kernel`), so every exchange between them
crosses from one datapath to the other: the wire format must be the same.
Tests run in file order on one shared pair of nodes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from corral.cluster.etcd import LocalEtcd
from corral.ebpf import loader
from corral.ebpf import overlay_fastpath as fastpath
from corral.node import netlink, netns
from tests.overlay_helpers import NEEDS_ROOT_AND_BCC, etcd_do, peer_seen_by_server, pod
from tests.overlay_testbed import Testbed, wait_for

pytestmark = NEEDS_ROOT_AND_BCC

DEADLINE = 45.0
FAST, KERNEL = 1, 2


@pytest.fixture(scope="module")
def bed(etcd: LocalEtcd) -> Iterator[Testbed]:
    etcd_do(etcd.url, lambda s: s.delete_prefix_raw("/corral/"))
    tb = Testbed(etcd.url, nodes=2)
    try:
        tb.start_agent(FAST, wait=False, extra=["--datapath", "bpf"])
        tb.start_agent(KERNEL, wait=False, extra=["--datapath", "kernel"])
        for i in (FAST, KERNEL):
            tb.wait_ready(i)
            tb.add_pod(i)
        tb.wait_fastpath(FAST)
        wait_for(lambda: tb.ping(pod(tb, FAST), pod(tb, KERNEL).ip), DEADLINE, "pods to talk")
        yield tb
    finally:
        tb.close()
        etcd_do(etcd.url, lambda s: s.delete_prefix_raw("/corral/"))


def programs(tb: Testbed, i: int) -> dict[str, list[str]]:
    """corral's tc programs per link name in node i."""
    k = tb.node(i)
    with netlink.iproute(k.ns) as ipr:
        return {
            str(link.get_attr("IFLA_IFNAME")): progs
            for link in ipr.get_links()
            if (progs := loader.attached(ipr, link["index"]))
        }


def device_packets(tb: Testbed, i: int) -> int:
    """Packets corral.1 sent plus received in node i."""
    with netlink.iproute(tb.node(i).ns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname="corral.1")[0])[0]
        st = link.get_attr("IFLA_STATS64")
        return int(st["rx_packets"]) + int(st["tx_packets"])


def datapath_file(tb: Testbed, i: int) -> dict[str, Any]:
    with open(os.path.join(tb.node(i).run_dir, "datapath.json")) as f:
        return json.load(f)


def ping_output(tb: Testbed, src_ns: str, dst: str, *extra: str) -> str:
    r = tb.run(src_ns, ["ping", "-c", "1", "-W", "2", *extra, dst], check=False)
    return r.stdout + r.stderr


def test_programs_sit_on_the_uplink_the_device_and_each_pod_veth(bed: Testbed) -> None:
    fast = programs(bed, FAST)
    assert fast["eth0"] == ["from_uplink"]
    assert fast["corral.1"] == ["from_overlay"]
    assert fast[f"v{pod(bed, FAST).name}"] == ["from_pod"]
    assert programs(bed, KERNEL) == {}
    assert "eBPF fast path on" in bed.agent_log(FAST)
    assert "eBPF fast path" not in bed.agent_log(KERNEL)


def test_fast_and_kernel_nodes_talk_both_ways_with_pod_ips(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)
    assert peer_seen_by_server(bed, p2.ns, p2.ip, p1.ns, 7101) == p1.ip
    assert peer_seen_by_server(bed, p1.ns, p1.ip, p2.ns, 7102) == p2.ip


def test_the_fast_node_leaves_its_vxlan_device_out(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)
    before = {i: device_packets(bed, i) for i in (FAST, KERNEL)}
    for _ in range(5):
        assert bed.ping(p1, p2.ip)
    # node-1 encapsulated the requests and decapsulated the replies in BPF;
    # node-2's kernel did both through its corral.1
    assert device_packets(bed, FAST) == before[FAST]
    assert device_packets(bed, KERNEL) >= before[KERNEL] + 10
    # and the node says so in its datapath file (rewritten by every full pass; one
    # written between a ping's request and its reply counts the request only)
    doc = wait_for(
        lambda: (
            (d := datapath_file(bed, FAST))["packets"]["encapsulated"] >= 5
            and d["packets"]["decapsulated"] >= 5
            and d
        ),
        DEADLINE,
        "datapath.json to count the encapsulated and decapsulated pings",
    )
    assert doc["datapath"] == "bpf" and doc["peers"] == 1 and doc["pods"] == 1
    kernel = datapath_file(bed, KERNEL)
    assert {k: kernel[k] for k in ("datapath", "why")} == {
        "datapath": "kernel",
        "why": "datapath kernel was asked for",
    }
    # the guards' drop counters (docs/overlay.md, "What a pod cannot do"), none here
    assert kernel["dropped"]["spoofed"] == 0 and "bpf" not in kernel["dropped"]
    assert set(doc["dropped"]["bpf"]) == {"spoofed", "vxlan_from_pods", "vxlan_foreign", "not_ipv4"}


def test_ttl_drops_once_per_node_as_on_the_kernel_path(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)
    assert "ttl=62" in ping_output(bed, p1.ns, p2.ip)  # reply: node-2 kernel, node-1 BPF
    assert "ttl=62" in ping_output(bed, p2.ns, p1.ip)  # reply: node-1 BPF, node-2 kernel
    # a TTL that would run out on the way is the kernel's, which says so
    out = ping_output(bed, p1.ns, p2.ip, "-t", "1")
    assert "Time to live exceeded" in out, out


def test_pods_of_one_node_reach_each_other_as_if_bridged(bed: Testbed) -> None:
    extra = bed.add_pod(FAST)
    p1 = pod(bed, FAST)
    wait_for(
        lambda: programs(bed, FAST).get(f"v{extra.name}") == ["from_pod"],
        DEADLINE,
        "the new pod's veth to get the fast path",
    )
    assert "ttl=64" in ping_output(bed, p1.ns, extra.ip)  # switched, not routed
    assert peer_seen_by_server(bed, extra.ns, extra.ip, p1.ns, 7103) == p1.ip
    # and the new pod is reached from the other node through the fast path too
    before = device_packets(bed, FAST)
    assert bed.ping(pod(bed, KERNEL), extra.ip, count=3)
    assert device_packets(bed, FAST) == before


UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(3); n = 0
try:
    while True:
        n += len(s.recv(65535))
except TimeoutError:
    pass
print(n)
"""

UDP_GSO_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, 103, 1400)  # UDP_SEGMENT: the kernel cuts 1400-byte datagrams
for size in (65000, 65507, 65507):  # up to the largest payload UDP allows
    s.sendto(b"x" * size, (sys.argv[1], int(sys.argv[2]))); time.sleep(0.2)
"""


def test_udp_gso_bursts_cross_whole(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)
    sink = bed.popen(
        p2.ns, [sys.executable, "-c", UDP_SINK, "7105"], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: ":7105" in bed.run(p2.ns, ["ss", "-lun"]).stdout,
            DEADLINE,
            "the UDP sink to listen",
        )
        bed.run(p1.ns, [sys.executable, "-c", UDP_GSO_SEND, p2.ip, "7105"])
        out, _ = sink.communicate(timeout=DEADLINE)
    finally:
        if sink.poll() is None:
            sink.kill()
        sink.wait()
    assert int(out) == 65000 + 2 * 65507


def test_pod_flows_skip_the_fast_nodes_conntrack(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)

    def tracked(i: int) -> bool:
        out = bed.run(bed.node(i).ns, ["conntrack", "-L", "-p", "icmp", "-n"], check=False).stdout
        return f"src={p1.ip} dst={p2.ip}" in out

    assert bed.ping(p1, p2.ip, count=2)
    assert tracked(KERNEL)  # forwarded by node-2's kernel
    assert not tracked(FAST)  # never entered node-1's netfilter


def restart(bed: Testbed, i: int, *extra: str, sig: int = signal.SIGTERM) -> None:
    """Restart node i's agent; unless it is told to use the kernel path, wait for the fast path."""
    readies = bed.agent_log(i).count("overlay ready")
    loads = bed.agent_log(i).count("eBPF fast path on")
    bed.stop_agent(i, sig)
    bed.start_agent(i, wait=False, extra=list(extra))
    wait_for(
        lambda: bed.agent_log(i).count("overlay ready") > readies,
        DEADLINE,
        f"node-{i}'s agent to be ready again",
    )
    if "kernel" not in extra:
        bed.wait_fastpath(i, runs=loads + 1)


STREAM = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
end = time.time() + float(sys.argv[3]); n = 0
while time.time() < end:
    c.sendall(b"x" * 65536); n += 1
print(n)
"""

SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); c, _ = s.accept()
while c.recv(1 << 20): pass
"""


def test_a_restart_swaps_programs_under_a_running_stream(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)
    sink = bed.popen(p2.ns, [sys.executable, "-c", SINK, "7104"])
    try:
        wait_for(
            lambda: bed.run(p2.ns, ["ss", "-ltn"]).stdout.count(":7104") > 0,
            DEADLINE,
            "the sink to listen",
        )
        stream = bed.popen(
            p1.ns,
            [sys.executable, "-c", STREAM, p2.ip, "7104", "6"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        restart(bed, FAST, "--datapath", "bpf", sig=signal.SIGKILL)
        out, err = stream.communicate(timeout=DEADLINE)
        assert stream.returncode == 0, err
        assert int(out) > 0
    finally:
        sink.kill()
        sink.wait()
    assert programs(bed, FAST)["eth0"] == ["from_uplink"]


def test_a_stopped_agent_leaves_the_programs_forwarding(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)
    bed.stop_agent(FAST)  # SIGTERM: a clean stop
    try:
        before = device_packets(bed, FAST)
        assert bed.ping(p1, p2.ip, count=2)
        assert bed.ping(p2, p1.ip, count=2)
        assert device_packets(bed, FAST) == before  # still the programs, not the device
    finally:
        loads = bed.agent_log(FAST).count("eBPF fast path on")
        bed.start_agent(FAST, wait=False, extra=["--datapath", "bpf"])
        bed.wait_fastpath(FAST, runs=loads + 1)


def test_datapath_kernel_takes_the_programs_away_and_auto_brings_them_back(bed: Testbed) -> None:
    p1, p2 = pod(bed, FAST), pod(bed, KERNEL)
    restart(bed, FAST, "--datapath", "kernel")
    assert programs(bed, FAST) == {}
    before = device_packets(bed, FAST)
    assert bed.ping(p1, p2.ip, count=2)
    assert device_packets(bed, FAST) >= before + 4  # the kernel's device carries it now
    restart(bed, FAST)  # auto: BCC is here, so the fast path
    wait_for(lambda: "from_pod" in str(programs(bed, FAST)), DEADLINE, "programs to return")
    assert bed.ping(p1, p2.ip)


def test_programs_removed_by_hand_come_back(bed: Testbed) -> None:
    veth = f"v{pod(bed, FAST).name}"
    for dev in ("eth0", veth):
        bed.run(
            bed.node(FAST).ns,
            ["tc", "filter", "del", "dev", dev, "ingress", "pref", str(loader.PRIO)],
        )
    assert "eth0" not in programs(bed, FAST)
    wait_for(
        lambda: (
            programs(bed, FAST).get("eth0") == ["from_uplink"]
            and programs(bed, FAST).get(veth) == ["from_pod"]
        ),
        DEADLINE,
        "the periodic pass to put the programs back",
    )
    before = device_packets(bed, FAST)
    assert bed.ping(pod(bed, KERNEL), pod(bed, FAST).ip, count=2)
    assert device_packets(bed, FAST) == before


def test_a_deleted_pod_leaves_the_map(bed: Testbed) -> None:
    extra = bed.add_pod(FAST)
    wait_for(
        lambda: programs(bed, FAST).get(f"v{extra.name}") == ["from_pod"],
        DEADLINE,
        "the new pod's veth to get the fast path",
    )
    netns.remove(extra.ns)  # the pod's veth pair goes with its namespace
    wait_for(
        lambda: f"fast path: pod {extra.ip} removed" in bed.agent_log(FAST),
        DEADLINE,
        "the agent to drop the pod",
    )
    bed.node(FAST).pods.remove(extra)
    assert bed.ping(pod(bed, KERNEL), pod(bed, FAST).ip)


@dataclass(frozen=True)
class _Remote:
    subnet: str
    public_ip: str
    vtep_mac: str

    @property
    def gateway(self) -> str:
        return self.subnet.split("/")[0][:-1] + "0"


def test_maps_hold_what_the_agent_said() -> None:
    """A load of its own (no node, no pins): config, peers and peer IPs as the programs see them."""
    fp = fastpath.FastPath()
    fp.load()
    try:
        mac = "02:00:00:00:00:01"
        fp.configure(
            fastpath.Settings("10.244.0.0/16", "10.244.1.0/24", 2, "172.31.0.1", 7, 4789, mac, 3)
        )
        c = fp.maps["config"].get(0)
        assert (c.vni, c.port, bytes(c.vtep_mac)) == (7, 0xB512, bytes.fromhex("020000000001"))
        a = _Remote("10.244.2.0/24", "172.31.0.2", "02:00:00:00:00:02")
        b = _Remote("10.244.3.0/24", "172.31.0.3", "02:00:00:00:00:03")
        fp.sync_peers([a, b], on_link=lambda ip: ip == a.public_ip)
        fp.sync_peer_ips({a.public_ip, b.public_ip})
        d = fp.describe()
        assert [(p["gateway"], p["nexthop"]) for p in d["peers"]] == [
            ("10.244.2.0", "172.31.0.2"),
            ("10.244.3.0", None),
        ]
        assert d["peerIPs"] == ["172.31.0.2", "172.31.0.3"]
        assert fp.sync_peers([b], on_link=lambda ip: False) == [
            "fast path: peer 10.244.2.0/24 removed"
        ]
        fp.sync_peer_ips({b.public_ip})
        d = fp.describe()
        assert [p["gateway"] for p in d["peers"]] == ["10.244.3.0"]
        assert d["peerIPs"] == ["172.31.0.3"] and d["pods"] == []
        assert fp.stats() == dict.fromkeys(fastpath.STATS, 0)
    finally:
        fp.close()
    assert fp.maps == {} and fp.describe() == {}
