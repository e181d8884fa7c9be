"""Overlay config checks and subnet leasing against a real etcd (no kernel state here)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from corral.api import netconfig as config
from corral.api.objects import NetworkConfig, NetworkSpec, Node, NodeAddress, NodeStatus
from corral.api.store import Store, subnet_key
from corral.cli.main import main as cli_main
from corral.cluster.etcd import LocalEtcd
from corral.node import iptables, netns, podguard, sysctl
from corral.overlay import guard, host, lease, masq, notrack


def spec(**kw: object) -> NetworkSpec:
    return config.parse_spec(kw)


# ------------------------------------------------------------ config


def test_defaults_are_the_documented_plan() -> None:
    s = NetworkSpec()
    assert (s.network, s.subnet_len, s.backend.vni, s.backend.port) == (
        "10.244.0.0/16",
        24,
        1,
        4789,
    )
    subnets = list(config.leasable_subnets(s))
    assert str(subnets[0]) == "10.244.1.0/24"  # the network's own first /24 is skipped
    assert str(subnets[-1]) == "10.244.255.0/24"
    assert len(subnets) == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        ({"network": "10.96.0.0/16"}, "overlaps spec.serviceCIDR"),
        ({"network": "10.244.0.0/16", "subnetLen": 16}, "subnetLen 16 must be longer"),
        ({"network": "10.244.0.0/16", "subnetLen": 31}, "subnetLen"),
        ({"network": "10.244.0.1/16"}, "not a CIDR"),
        ({"backend": {"vni": 0}}, "backend.vni"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(data: dict, reason: str) -> None:
    with pytest.raises(config.ConfigError, match=reason):
        config.parse_spec(data)


def test_range_containing_the_node_address_is_refused() -> None:
    with pytest.raises(config.ConfigError, match=re.escape("contains the node address 10.244.3.7")):
        config.check_underlay(spec(), ["172.30.0.1", "10.244.3.7"])
    with pytest.raises(config.ConfigError, match="serviceCIDR"):
        config.check_underlay(spec(), ["10.100.0.5"])
    config.check_underlay(spec(), ["172.30.0.1"])


def test_subnet_range_limits() -> None:
    s = spec(network="10.50.0.0/16", subnetLen=26, subnetMin="10.50.1.0", subnetMax="10.50.1.128")
    assert [str(n) for n in config.leasable_subnets(s)] == [
        "10.50.1.0/26",
        "10.50.1.64/26",
        "10.50.1.128/26",
    ]


# ------------------------------------------------------------ leases


def leaser(store: Store, name: str, ip: str, s: NetworkSpec | None = None) -> lease.SubnetLeaser:
    return lease.SubnetLeaser(
        store, name, ip, f"02:00:00:00:00:{ip.split('.')[-1]:0>2}", s or NetworkSpec(), ttl=5
    )


async def test_nodes_get_distinct_subnets_with_their_record(store: Store) -> None:
    a = await leaser(store, "a", "172.30.0.1").acquire()
    b = await leaser(store, "b", "172.30.0.2").acquire()
    assert a.subnet != b.subnet
    kv = await store.get_raw(subnet_key(a.subnet))
    assert kv is not None and kv.lease == a.lease_id
    rec = lease.decode(kv.value)
    assert rec is not None
    assert (rec.node_name, rec.public_ip, rec.vtep_mac, rec.backend_type) == (
        "a",
        "172.30.0.1",
        "02:00:00:00:00:01",
        "vxlan",
    )


async def test_restarted_node_gets_its_subnet_back(store: Store) -> None:
    first = await leaser(store, "a", "172.30.0.1").acquire()
    await leaser(store, "b", "172.30.0.2").acquire()
    # still leased (agent restarted within the TTL): the record is taken over
    again = await leaser(store, "a", "172.30.0.1").acquire()
    assert again.subnet == first.subnet and again.lease_id != first.lease_id
    # expired meanwhile: the persisted subnet is preferred over the lowest free one
    await store.revoke_lease(again.lease_id)
    assert await store.get_raw(subnet_key(first.subnet)) is None
    back = await leaser(store, "a", "172.30.0.1").acquire(preferred=first.subnet)
    assert back.subnet == first.subnet


async def test_a_node_whose_subnet_was_taken_moves(store: Store) -> None:
    a = await leaser(store, "a", "172.30.0.1").acquire()
    await store.revoke_lease(a.lease_id)
    thief = await leaser(store, "c", "172.30.0.3").acquire(preferred=a.subnet)
    assert thief.subnet == a.subnet
    moved = await leaser(store, "a", "172.30.0.1").acquire(preferred=a.subnet)
    assert moved.subnet != a.subnet


async def test_renew_notices_a_deleted_lease(store: Store) -> None:
    lsr = leaser(store, "a", "172.30.0.1")
    held = await lsr.acquire()
    assert await lsr.renew(held)
    await store.delete_raw(held.key)
    assert not await lsr.renew(held)


async def test_full_network_is_reported(store: Store) -> None:
    small = spec(network="10.77.0.0/29", subnetLen=30)
    await leaser(store, "a", "172.30.0.1", small).acquire()
    with pytest.raises(lease.NoFreeSubnet, match=re.escape("no free /30 left in 10.77.0.0/29")):
        await leaser(store, "b", "172.30.0.2", small).try_acquire()


async def test_remove_node_leases(store: Store) -> None:
    a = await leaser(store, "a", "172.30.0.1").acquire()
    await leaser(store, "b", "172.30.0.2").acquire()
    assert await lease.remove_node_leases(store, "a") == [a.subnet]
    assert [le.node_name for le in await config.list_leases(store)] == ["b"]


# ------------------------------------------------------------ set_config / CLI


async def test_set_config_refuses_a_range_with_a_node_address(store: Store) -> None:
    await store.create(
        Node(
            metadata={"name": "n1"},
            status=NodeStatus(addresses=[NodeAddress(type="InternalIP", address="172.30.0.1")]),
        )
    )
    before = await config.load(store)
    with pytest.raises(config.ConfigError, match=re.escape("contains the node address 172.30.0.1")):
        await config.set_config(store, spec(network="172.30.0.0/16"))
    after = await store.get(NetworkConfig, "cluster")
    assert after is not None and after.spec == before.spec


async def test_set_config_keeps_the_address_plan_under_leases(store: Store) -> None:
    await leaser(store, "a", "172.30.0.1").acquire()
    with pytest.raises(config.ConfigError, match="hold subnet leases"):
        await config.set_config(store, spec(network="10.240.0.0/16"))
    cfg, changed = await config.set_config(store, spec(ipMasq=False))
    assert changed and cfg.spec.ip_masq is False


def test_cli_network_set_and_show(
    etcd: LocalEtcd, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["--etcd", etcd.url]
    assert cli_main([*args, "network", "set", "--network", "10.96.0.0/16"]) == 1
    err = capsys.readouterr().err
    assert "network config refused" in err and "overlaps spec.serviceCIDR" in err
    assert cli_main([*args, "network", "set", "--subnet-len", "28", "--direct-routing", "on"]) == 0
    assert "configured" in capsys.readouterr().out
    assert cli_main([*args, "network", "show"]) == 0
    out = capsys.readouterr().out
    assert "a /28 per node" in out and "directRouting on" in out
    assert cli_main([*args, "node", "remove", "nope"]) == 1
    assert "not found" in capsys.readouterr().err
    assert (
        cli_main(
            [
                *args,
                "network",
                "set",
                "--network",
                "10.244.0.0/16",
                "--subnet-len",
                "24",
                "--direct-routing",
                "off",
            ]
        )
        == 0
    )
    manifest = tmp_path / "net.yaml"
    manifest.write_text(
        "apiVersion: corral.dev/v1\nkind: NetworkConfig\n"
        "metadata: {name: cluster}\nspec: {ipMasq: false}\n"
    )
    assert cli_main([*args, "network", "set", "-f", str(manifest)]) == 0
    assert cli_main([*args, "network", "show", "-o", "json"]) == 0
    assert '"ipMasq": false' in capsys.readouterr().out
    manifest.write_text("apiVersion: corral.dev/v1\nkind: NetworkConfig\nspec: {subnetLen: 40}\n")
    assert cli_main([*args, "network", "set", "-f", str(manifest)]) == 1
    assert "subnetLen" in capsys.readouterr().err
    assert cli_main([*args, "network", "set", "--ip-masq", "on"]) == 0


# ------------------------------------------------------------ masquerade rules


def test_sysctl_names_map_to_proc_sys_paths() -> None:
    assert sysctl.path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    # a dotted name keeps the dot of an interface name written with a slash
    assert sysctl.path("net.ipv4.conf.eth0/100.forwarding") == (
        "/proc/sys/net/ipv4/conf/eth0.100/forwarding"
    )
    assert sysctl.path("net/ipv4/conf/eth0.100/rp_filter") == (
        "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
def test_host_settings_turn_forwarding_on_in_the_node_namespace_only(scratch_ns: str) -> None:
    host_before = sysctl.read("net.ipv4.ip_forward")
    assert sysctl.read("net.ipv4.ip_forward", scratch_ns) == "0"  # a new namespace's default
    spec = NetworkSpec(network="10.244.0.0/16")
    assert "IPv4 forwarding on" in host.apply(scratch_ns, spec, ip_forward=True)
    assert sysctl.read("net.ipv4.ip_forward", scratch_ns) == "1"
    assert host.apply(scratch_ns, spec, ip_forward=True) == []  # nothing left to change
    assert sysctl.read("net.ipv4.ip_forward") == host_before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
def test_masquerade_rules_are_idempotent_and_switch_off(scratch_ns: str) -> None:
    assert masq.ensure(scratch_ns, "10.244.0.0/16", True)
    assert not masq.ensure(scratch_ns, "10.244.0.0/16", True)  # nothing left to change
    assert iptables.chain_rules(scratch_ns, "nat", masq.CHAIN) == masq.rules("10.244.0.0/16")
    assert iptables.has_rule(scratch_ns, "nat", "POSTROUTING", masq.JUMP)
    save = netns.run(scratch_ns, ["iptables-save", "-t", "nat"]).stdout
    assert save.count("-j CORRAL-POSTROUTING") == 1
    assert masq.ensure(scratch_ns, "10.244.0.0/16", False)
    assert not masq.ensure(scratch_ns, "10.244.0.0/16", False)
    assert iptables.chain_rules(scratch_ns, "nat", masq.CHAIN) is None
    assert not iptables.has_rule(scratch_ns, "nat", "POSTROUTING", masq.JUMP)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
def test_vxlan_bypass_rules_are_idempotent_repaired_and_leave_others_alone(scratch_ns: str) -> None:
    netns.run(
        scratch_ns,
        [
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "--dport",
            "22",
            "-j",
            "CT",
            "--notrack",
        ],
    )
    assert notrack.ensure(scratch_ns, 4789)
    assert not notrack.ensure(scratch_ns, 4789)  # nothing left to change
    assert iptables.chain_rules(scratch_ns, "raw", notrack.CHAIN) == notrack.rules(4789)
    assert all(iptables.has_rule(scratch_ns, "raw", h, notrack.JUMP) for h in notrack.HOOKS)
    # a jump removed by hand comes back, once
    netns.run(scratch_ns, ["iptables", "-t", "raw", "-D", "OUTPUT", *notrack.JUMP])
    assert notrack.ensure(scratch_ns, 4789)
    save = netns.run(scratch_ns, ["iptables-save", "-t", "raw"]).stdout
    assert save.count("-j CORRAL-VXLAN") == 2
    # a new VXLAN port replaces the old rule
    assert notrack.ensure(scratch_ns, 8472)
    assert iptables.chain_rules(scratch_ns, "raw", notrack.CHAIN) == notrack.rules(8472)
    # someone else's rule is untouched
    assert "--dport 22" in netns.run(scratch_ns, ["iptables", "-t", "raw", "-S"]).stdout


async def test_a_renamed_node_keeps_its_subnet_by_public_ip(store: Store) -> None:
    old = await leaser(store, "old-name", "172.30.0.1").acquire()
    # same machine (same state dir, so the same preferred subnet), new name
    renamed = await leaser(store, "new-name", "172.30.0.1").acquire(preferred=old.subnet)
    assert renamed.subnet == old.subnet
    # another node that merely shares the public IP does not take it
    other = await leaser(store, "other", "172.30.0.1").acquire()
    assert other.subnet != old.subnet


# ------------------------------------------------ guards (traffic: test_overlay_guard.py)

SENDTO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 0))
s.sendto(b"x", ("127.0.0.1", 4789))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
def test_vxlan_guard_follows_peers_one_rule_at_a_time_and_keeps_its_counters(
    scratch_ns: str,
) -> None:
    net = "10.244.0.0/16"
    assert guard.ensure(scratch_ns, net, 4789, {"172.30.0.2"})
    assert guard.ensure(scratch_ns, net, 4789, {"172.30.0.2"}) == []  # nothing left to change
    netns.run(scratch_ns, ["ip", "link", "set", "lo", "up"])
    netns.run(scratch_ns, ["ip", "addr", "add", "10.244.5.5/32", "dev", "lo"])
    # a "pod" source and a stranger (127.0.0.1) each send one VXLAN packet: both dropped
    for src in ("10.244.5.5", "127.0.0.1"):
        netns.run(scratch_ns, [sys.executable, "-c", SENDTO, src])
    assert guard.kernel_drops(scratch_ns) == {"vxlan_from_pods": 1, "vxlan_foreign": 1}
    assert guard.ensure(scratch_ns, net, 4789, {"172.30.0.3", "172.30.0.4"}) == [
        "VXLAN guard: 172.30.0.2/32 no longer a peer",
        "VXLAN guard: VXLAN from peer 172.30.0.3 accepted",
        "VXLAN guard: VXLAN from peer 172.30.0.4 accepted",
    ]
    rules = iptables.chain_rules(scratch_ns, "raw", guard.CHAIN)
    assert rules is not None and sorted(rules[1:-1]) == [
        guard.peer_rule("172.30.0.3", 4789),
        guard.peer_rule("172.30.0.4", 4789),
    ]
    assert guard.kernel_drops(scratch_ns) == {"vxlan_from_pods": 1, "vxlan_foreign": 1}
    # a peer's own packets pass: 127.0.0.1 made a peer
    assert guard.ensure(scratch_ns, net, 4789, {"127.0.0.1"})
    netns.run(scratch_ns, [sys.executable, "-c", SENDTO, "127.0.0.1"])
    assert guard.kernel_drops(scratch_ns)["vxlan_foreign"] == 1
    # jumps removed by hand come back; a new port rewrites the chain
    netns.run(scratch_ns, ["iptables", "-t", "raw", "-D", "PREROUTING", *guard.JUMP])
    netns.run(scratch_ns, ["iptables", "-D", "FORWARD", *guard.FILTER_JUMP])
    assert guard.ensure(scratch_ns, net, 4789, {"127.0.0.1"})
    assert iptables.has_rule(scratch_ns, "raw", "PREROUTING", guard.JUMP)
    assert iptables.has_rule(scratch_ns, "filter", "FORWARD", guard.FILTER_JUMP)
    assert guard.ensure(scratch_ns, net, 8472, {"127.0.0.1"})
    assert iptables.chain_rules(scratch_ns, "raw", guard.CHAIN) == [
        guard.pods_rule(net, 8472),
        guard.peer_rule("127.0.0.1", 8472),
        guard.foreign_rule(8472),
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
def test_pod_guard_chains_follow_the_pods_and_leave_others_alone(scratch_ns: str) -> None:
    a = podguard.PodSource("vetha", "10.244.1.2", "02:00:00:00:00:0a")
    b = podguard.PodSource("vethb", "10.244.1.3", "02:00:00:00:00:0b", "10.244.1.128/25")
    netns.run(scratch_ns, ["ebtables", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT"])
    podguard.add(scratch_ns, a)  # the first pod on a node makes the base chain too
    podguard.add(scratch_ns, a)  # a repeated ADD: a second dispatch rule
    assert podguard.sync(scratch_ns, {"vetha": a, "vethb": b})
    assert podguard.sync(scratch_ns, {"vetha": a, "vethb": b}) == []
    saved = podguard.read(scratch_ns)
    dispatch = ["-i vetha -j CORRAL-P-vetha", "-i vethb -j CORRAL-P-vethb"]
    assert saved.rules[podguard.CHAIN] == dispatch  # the repeated ADD's duplicate went
    assert saved.rules["CORRAL-P-vethb"] == podguard.pod_rules(b)
    assert saved.rules["PREROUTING"] == [f"-j {podguard.CHAIN}"]
    assert podguard.sync(scratch_ns, {"vethb": b}) == ["pod guard: vetha gone, its chain removed"]
    assert "CORRAL-P-vetha" not in podguard.read(scratch_ns).chains
    assert podguard.forget(scratch_ns, "vethb") and not podguard.forget(scratch_ns, "vethb")
    assert podguard.remove(scratch_ns)
    saved = podguard.read(scratch_ns)
    assert not [c for c in saved.chains if c.startswith("CORRAL-")]
    assert saved.rules["POSTROUTING"] == ["-j ACCEPT"]  # someone else's rule is untouched
