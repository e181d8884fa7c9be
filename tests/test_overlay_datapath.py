"""The VXLAN overlay on the real kernel: three simulated nodes, their agents as processes.

The nodes are network namespaces on one switch namespace (see
corral.overlay.testbed); each runs `python -m corral.overlay.agent` against the
session's etcd. Tests in this module share that cluster and run in file order:
the last ones take nodes away.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.api.objects import NetworkConfig, Node, SubnetLease
from corral.api.store import Store, subnet_key
from corral.cli.cmd_network import cmd_node_remove
from corral.cluster.etcd import LocalEtcd
from corral.ebpf import loader
from corral.overlay import lease as leases
from tests.overlay_helpers import CONNECT, etcd_do, peer_seen_by_server, pod
from tests.overlay_testbed import SWITCH_IP, Testbed, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

DEADLINE = 45.0


@pytest.fixture(scope="module")
def bed(etcd: LocalEtcd) -> Iterator[Testbed]:
    etcd_do(etcd.url, lambda s: s.delete_prefix_raw("/corral/"))
    tb = Testbed(etcd.url, nodes=3)
    try:
        for i in (1, 2, 3):
            tb.start_agent(i, wait=False)
        for i in (1, 2, 3):
            tb.wait_ready(i)
            tb.add_pod(i)
        for i in (1, 2, 3):
            wait_for(
                lambda i=i: len(tb.snapshot(i)["routes"]) == 2,
                DEADLINE,
                f"node-{i} to have routes to both peers",
            )
            if loader.unavailable() is None:  # the default datapath: wait for the programs
                tb.wait_fastpath(i)
        yield tb
    finally:
        tb.close()
        etcd_do(etcd.url, lambda s: s.delete_prefix_raw("/corral/"))


# ------------------------------------------------------------ data path


def test_pods_ping_each_other_across_nodes(bed: Testbed) -> None:
    for a, b in ((1, 2), (2, 1), (1, 3), (3, 2)):
        wait_for(
            lambda a=a, b=b: bed.ping(pod(bed, a), pod(bed, b).ip),
            DEADLINE,
            f"pod on node-{a} to ping the pod on node-{b}",
        )


def test_server_sees_the_client_pod_ip_both_ways(bed: Testbed) -> None:
    p1, p2 = pod(bed, 1), pod(bed, 2)
    assert peer_seen_by_server(bed, p2.ns, p2.ip, p1.ns, 7001) == p1.ip
    assert peer_seen_by_server(bed, p1.ns, p1.ip, p2.ns, 7002) == p2.ip


def test_subnet_file_and_device_follow_the_lease(bed: Testbed) -> None:
    info = bed.node(1).subnet_info()
    assert info is not None
    assert info["network"] == "10.244.0.0/16" and info["node"] == "node-1"
    assert info["mtu"] == 1450 and info["ipMasq"] is True
    dev = bed.snapshot(1)["device"]
    assert dev["addresses"] == [info["subnet"].replace("/24", "/32")]
    assert (dev["vni"], dev["port"], dev["learning"], dev["local"], dev["mtu"]) == (
        1,
        4789,
        0,
        bed.node(1).ip,
        1450,
    )


def test_underlay_capture_shows_vxlan_vni_1_with_pod_ips(bed: Testbed, tmp_path: Any) -> None:
    from scapy.all import IP, VXLAN, rdpcap

    pcap, errf = tmp_path / "u.pcap", tmp_path / "tcpdump.err"
    with open(errf, "wb") as err:
        # on node-1's switch port: a bridge device itself only sees frames for its own stack
        dump = bed.popen(
            bed.switch,
            [
                "tcpdump",
                "-i",
                "n1",
                "-U",
                "--immediate-mode",
                "-n",
                "-w",
                str(pcap),
                "udp",
                "port",
                "4789",
            ],
            stderr=err,
        )
    try:
        wait_for(lambda: b"listening on" in errf.read_bytes(), DEADLINE, "tcpdump to listen")
        p1, p2 = pod(bed, 1), pod(bed, 2)
        assert bed.ping(p1, p2.ip, count=3)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=30)
    found = []
    for pkt in rdpcap(str(pcap)):
        if VXLAN in pkt and IP in pkt[VXLAN]:
            inner = pkt[VXLAN][IP]
            found.append((pkt[IP].src, pkt[IP].dst, pkt[VXLAN].vni, inner.src, inner.dst))
    assert (bed.node(1).ip, bed.node(2).ip, 1, p1.ip, p2.ip) in found
    assert (bed.node(2).ip, bed.node(1).ip, 1, p2.ip, p1.ip) in found


def test_only_traffic_leaving_the_cluster_is_masqueraded(bed: Testbed) -> None:
    p1 = pod(bed, 1)
    # to an address outside the cluster network: the node's address, not the pod's
    assert peer_seen_by_server(bed, bed.switch, SWITCH_IP, p1.ns, 7003) == bed.node(1).ip
    # switching it off removes corral's rules; switching it on restores them
    rules = lambda: bed.run(bed.node(1).ns, ["iptables", "-t", "nat", "-S"]).stdout  # noqa: E731
    assert "MASQUERADE" in rules()
    set_config(bed, ip_masq=False)
    try:
        wait_for(lambda: "MASQUERADE" not in rules(), DEADLINE, "masquerade rules to go")
        wait_for(
            lambda: bed.node(1).subnet_info()["ipMasq"] is False,
            DEADLINE,
            "subnet.json to say ipMasq false",
        )
    finally:
        set_config(bed, ip_masq=True)
    wait_for(lambda: "MASQUERADE" in rules(), DEADLINE, "masquerade rules to come back")


def test_outer_vxlan_packets_skip_conntrack(bed: Testbed) -> None:
    p1, p2 = pod(bed, 1), pod(bed, 2)
    n1 = bed.node(1).ns

    def conntrack() -> str:
        return bed.run(n1, ["conntrack", "-L", "-n"], check=False).stdout

    assert bed.ping(p1, p2.ip, count=2)
    assert "dport=4789" not in conntrack()  # the encapsulating UDP packets are untracked
    # (whether the pods' own flow is tracked depends on the datapath: test_overlay_fastpath)
    # the bypass repairs itself when removed by hand
    bed.run(n1, ["iptables", "-t", "raw", "-F", "CORRAL-VXLAN"])
    wait_for(
        lambda: "--notrack" in bed.run(n1, ["iptables", "-t", "raw", "-S"]).stdout,
        DEADLINE,
        "the conntrack bypass to come back",
    )


def set_config(bed: Testbed, **changes: Any) -> None:
    def change(cfg: NetworkConfig) -> NetworkConfig:
        for k, v in changes.items():
            target = cfg.spec.backend if k == "direct_routing" else cfg.spec
            setattr(target, k, v)
        return cfg

    etcd_do(bed.etcd_url, lambda s: s.modify(NetworkConfig, "cluster", None, change))


# ------------------------------------------------------------ self-healing


def _ipr(bed: Testbed, i: int) -> Any:
    from corral.node import netlink

    return netlink.iproute(bed.node(i).ns)


def test_hand_made_damage_is_repaired(bed: Testbed) -> None:
    good = bed.snapshot(1)
    idx = good["device"]["index"]
    dst, gw, _, _ = good["routes"][0]
    mac, remote_ip = good["fdb"][0]
    with _ipr(bed, 1) as ipr:
        ipr.route("del", dst=dst, gateway=gw, oif=idx)
    wait_for(lambda: bed.snapshot(1) == good, DEADLINE, "the deleted route to come back")
    with _ipr(bed, 1) as ipr:
        ipr.fdb("del", ifindex=idx, lladdr=mac, dst=remote_ip)
        ipr.fdb(
            "append", ifindex=idx, lladdr="02:11:22:33:44:55", dst="172.30.0.77", state=128, flags=2
        )
    wait_for(
        lambda: bed.snapshot(1) == good,
        DEADLINE,
        "the deleted FDB entry back and the stale one gone",
    )
    with _ipr(bed, 1) as ipr:
        ipr.link("set", index=idx, address="02:de:ad:be:ef:01")
    wait_for(lambda: bed.snapshot(1) == good, DEADLINE, "the VTEP MAC to be restored")
    with _ipr(bed, 1) as ipr:
        ipr.link("del", index=idx)

    def same_but_index() -> bool:
        s = bed.snapshot(1)
        if s["device"] is None:
            return False
        new = s["device"]["index"]
        s["device"]["index"] = idx
        s["routes"] = [(d, g, idx if o == new else o, f) for d, g, o, f in s["routes"]]
        return s == good

    wait_for(same_but_index, DEADLINE, "the deleted device to be recreated with its entries")
    wait_for(lambda: bed.ping(pod(bed, 2), pod(bed, 1).ip), DEADLINE, "pods to talk again")


STREAM_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen()
c, _ = s.accept()
while (d := c.recv(65536)):
    c.sendall(d)
"""

STREAM_CLIENT = (
    CONNECT
    + """
c.settimeout(10)
n = 0
while not os.path.exists(sys.argv[3]):
    c.sendall(b"x" * 1000)
    got = 0
    while got < 1000:
        d = c.recv(1000 - got)
        if not d: raise SystemExit("connection closed")
        got += len(d)
    n += 1
    if n % 20 == 0:
        open(sys.argv[4], "w").write(str(n))
    time.sleep(0.005)
print(n)
"""
)


def test_kill_9_and_restart_keeps_streams_and_state(bed: Testbed, tmp_path: Any) -> None:
    p1, p2 = pod(bed, 1), pod(bed, 2)
    stop, progress = tmp_path / "stop", tmp_path / "progress"
    srv = bed.popen(p2.ns, [sys.executable, "-c", STREAM_SERVER, "7010"])
    cli = bed.popen(
        p1.ns,
        [sys.executable, "-c", STREAM_CLIENT, p2.ip, "7010", str(stop), str(progress)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        count = lambda: int(progress.read_text() or 0) if progress.exists() else 0  # noqa: E731
        wait_for(lambda: count() > 0, DEADLINE, "the stream to start")
        before = {i: bed.snapshot(i) for i in (1, 2)}
        nat = lambda: bed.run(bed.node(1).ns, ["iptables", "-t", "nat", "-S"]).stdout  # noqa: E731
        nat_before = nat()
        bed.stop_agent(1, signal.SIGKILL)
        seen = count()
        wait_for(lambda: count() > seen + 20, DEADLINE, "the stream to go on without an agent")
        readies = bed.agent_log(1).count("overlay ready")
        bed.start_agent(1, wait=False)
        wait_for(
            lambda: bed.agent_log(1).count("overlay ready") > readies,
            DEADLINE,
            "the restarted agent to be ready",
        )
        seen = count()
        wait_for(lambda: count() > seen + 20, DEADLINE, "the stream to go on after the restart")
        time.sleep(1.5)  # one resync period of the restarted agent, so it had its say
        assert {i: bed.snapshot(i) for i in (1, 2)} == before
        assert nat() == nat_before
        stop.write_text("")
        out, err = cli.communicate(timeout=DEADLINE)
        assert cli.returncode == 0, err
        assert int(out) > 0
    finally:
        for p in (cli, srv):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_lost_lease_is_reacquired(bed: Testbed) -> None:
    subnet = bed.node(2).subnet_info()["subnet"]

    async def drop(s: Store) -> None:
        await s.delete_raw(subnet_key(subnet))

    etcd_do(bed.etcd_url, drop)

    def back() -> bool:
        kv = etcd_do(bed.etcd_url, lambda s: s.get_raw(subnet_key(subnet)))
        return kv is not None and leases.decode(kv.value).node_name == "node-2"

    wait_for(back, DEADLINE, "node-2 to re-take its subnet")
    assert "was lost" in bed.agent_log(2)
    wait_for(lambda: bed.ping(pod(bed, 1), pod(bed, 2).ip), DEADLINE, "pods to talk")


def test_direct_routing_skips_encapsulation_on_link(bed: Testbed) -> None:
    # the baseline: both peers programmed (the test before re-leases node-2)
    def both_peers() -> dict[str, Any] | None:
        snap = bed.snapshot(1)
        return snap if len(snap["routes"]) == 2 else None

    encap = wait_for(both_peers, DEADLINE, "node-1 to have entries for both peers")
    set_config(bed, direct_routing=True)
    try:

        def direct() -> bool:
            s = bed.snapshot(1)
            return (
                not s["fdb"]
                and all(gw.startswith("172.30.0.") for _, gw, _, _ in s["routes"])
                and len(s["routes"]) == 2
            )

        wait_for(direct, DEADLINE, "routes straight via the peers' underlay addresses")
        wait_for(lambda: bed.ping(pod(bed, 1), pod(bed, 3).ip), DEADLINE, "pods to talk")
    finally:
        set_config(bed, direct_routing=False)
    try:
        wait_for(lambda: bed.snapshot(1) == encap, DEADLINE, "the VXLAN entries to come back")
    except AssertionError as e:
        raise AssertionError(f"{e}: wanted {encap}, have {bed.snapshot(1)}") from None


def test_lease_added_and_removed_in_etcd(bed: Testbed) -> None:
    ghost = SubnetLease(
        subnet="10.244.200.0/24",
        node_name="ghost",
        public_ip="172.30.0.99",
        vtep_mac="02:00:00:00:00:99",
    )
    etcd_do(bed.etcd_url, lambda s: s.put_raw(subnet_key(ghost.subnet), leases.encode(ghost)))
    has = lambda i: any(r[0] == ghost.subnet for r in bed.snapshot(i)["routes"])  # noqa: E731
    for i in (1, 2, 3):
        wait_for(
            lambda i=i: has(i) and ("02:00:00:00:00:99", "172.30.0.99") in bed.snapshot(i)["fdb"],
            DEADLINE,
            f"node-{i} to route to the new lease",
        )
    etcd_do(bed.etcd_url, lambda s: s.delete_raw(subnet_key(ghost.subnet)))
    for i in (1, 2, 3):
        wait_for(
            lambda i=i: not has(i) and "10.244.200.0" not in str(bed.snapshot(i)),
            DEADLINE,
            f"node-{i} to drop every entry of the removed lease",
        )


def test_a_node_whose_subnet_is_taken_moves_loudly(bed: Testbed) -> None:
    old = bed.node(2).subnet_info()["subnet"]
    thief = SubnetLease(
        subnet=old, node_name="thief", public_ip="172.30.0.98", vtep_mac="02:00:00:00:00:98"
    )
    etcd_do(bed.etcd_url, lambda s: s.put_raw(subnet_key(old), leases.encode(thief)))
    moved = wait_for(
        lambda: (
            (bed.node(2).subnet_info() or {}).get("subnet") not in (None, old)
            and bed.node(2).subnet_info()["subnet"]
        ),
        DEADLINE,
        "node-2 to move",
    )
    assert f"SUBNET CHANGED for node node-2: {old} -> {moved}" in bed.agent_log(2)
    wait_for(
        lambda: bed.snapshot(2)["device"]["addresses"] == [moved.replace("/24", "/32")],
        DEADLINE,
        "the device address to follow",
    )
    node = etcd_do(bed.etcd_url, lambda s: s.get(Node, "node-2"))
    assert node.spec.pod_cidr == moved
    wait_for(
        lambda: any(r[0] == moved for r in bed.snapshot(1)["routes"]),
        DEADLINE,
        "node-1 to route the new subnet",
    )
    etcd_do(bed.etcd_url, lambda s: s.delete_raw(subnet_key(old)))
    assert bed.node(2).proc is not None and bed.node(2).proc.poll() is None  # never exits


# ------------------------------------------------------------ nodes leaving (last)


def test_removed_node_vanishes_from_the_others(bed: Testbed) -> None:
    subnet3 = bed.node(3).subnet_info()["subnet"]
    bed.stop_agent(3, signal.SIGKILL)
    assert cmd_node_remove(argparse.Namespace(etcd=bed.etcd_url, name="node-3")) == 0
    for i in (1, 2):
        wait_for(
            lambda i=i: subnet3.split("/")[0] not in str(bed.snapshot(i)),
            DEADLINE,
            f"node-{i} to forget node-3",
        )


def test_expired_lease_vanishes_from_the_others(bed: Testbed) -> None:
    subnet2 = bed.node(2).subnet_info()["subnet"]
    bed.stop_agent(2, signal.SIGKILL)  # no renewals: the etcd lease (TTL 6 s) runs out
    wait_for(
        lambda: subnet2.split("/")[0] not in str(bed.snapshot(1)),
        DEADLINE,
        "node-1 to forget node-2 after its lease expired",
    )
    assert etcd_do(bed.etcd_url, lambda s: s.get_raw(subnet_key(subnet2))) is None
