"""corral-cni + corral-ipam driven by the libcni Go client and by direct plugin exec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.api.store import Store, ipam_ip_key, ipam_owner_key
from corral.node import netns, podguard
from tests import cni_helpers
from tests.cni_helpers import CNINode, wait_until

POOL = "10.244.1.0-24"
cni_node = cni_helpers.cni_node
shared_cni_node = cni_helpers.shared_cni_node
libcni_client = cni_helpers.libcni_client


def conf(**plugin: Any) -> dict[str, Any]:
    """A single-plugin config as libcni would hand it to corral-cni."""
    return {
        "cniVersion": "1.0.0",
        "name": "corral",
        "type": "corral-cni",
        "ipam": {"type": "corral-ipam"},
        **plugin,
    }


async def allocations(store: Store, pool: str = POOL) -> dict[str, str]:
    """ip -> containerID for every allocation in the pool."""
    kvs, _ = await store.list_raw(f"/corral/v1/ipam/{pool}/ips/")
    return {kv.key.rsplit("/", 1)[1]: json.loads(kv.value)["containerID"] for kv in kvs}


def pod_links(node: CNINode, pod: str) -> dict[str, dict[str, Any]]:
    return node.links(pod)


@pytest.mark.parametrize("cni_node", ["python", "native"], indirect=True)
async def test_add_check_del_through_libcni(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    host_forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    pod = node.pod()
    rc, res = node.libcni("add", "ctr-a", pod)
    assert rc == 0, (res, node.log())
    assert res["cniVersion"] == "1.0.0"
    [ip] = res["ips"]
    assert ip["address"].startswith("10.244.1.") and ip["address"].endswith("/24")
    assert ip["gateway"] == "10.244.1.1"
    assert res["interfaces"][ip["interface"]] == {
        "name": "eth0",
        "mac": res["interfaces"][2]["mac"],
        "sandbox": pod,
    }
    assert {"dst": "0.0.0.0/0", "gw": "10.244.1.1"} in res["routes"]

    # The pod: eth0 with the address and the overlay MTU, lo up, default route.
    links = pod_links(node, pod)
    assert links["eth0"]["addrs"] == [ip["address"]]
    assert links["eth0"]["mtu"] == 1450 and links["eth0"]["up"]
    assert links["lo"]["up"]
    assert node.default_gateways(pod) == ["10.244.1.1"]
    # The node: the bridge holds the gateway; the host end is on it, up, hairpin on.
    nl = node.links()
    assert "10.244.1.1/24" in nl["cni0"]["addrs"]
    host = res["interfaces"][1]["name"]
    assert nl[host]["master"] == nl["cni0"]["index"] and nl[host]["up"]
    assert node.hairpin()[nl[host]["index"]] == 1
    # The host end names the pod behind it, for the overlay's eBPF fast path.
    assert (
        nl[host]["ifalias"] == f"corral-pod {ip['address'].split('/')[0]} "
        f"{res['interfaces'][2]['mac']}"
    )
    # The node forwards for its pods; the host's own setting is untouched.
    assert netns.run(node.name, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forwarding
    # The pod reaches its gateway over the veth.
    assert netns.run(pod, ["ping", "-c1", "-W5", "10.244.1.1"], check=False).returncode == 0
    # etcd: one IP key and its owner index.
    addr = ip["address"].split("/")[0]
    assert await allocations(store) == {addr: "ctr-a"}
    owner = await store.get_raw(ipam_owner_key(POOL, "ctr-a", "eth0"))
    assert owner is not None and owner.value.decode() == addr

    rc, res_check = node.libcni("check", "ctr-a", pod)
    assert rc == 0, res_check
    # CHECK notices what is really missing: take the address away.
    netns.run(pod, ["ip", "addr", "del", ip["address"], "dev", "eth0"])
    rc, err = node.libcni("check", "ctr-a", pod)
    assert rc != 0 and err["code"] == 103 and "does not hold" in err["msg"]

    rc, out = node.libcni("del", "ctr-a", pod)
    assert rc == 0, out
    assert await allocations(store) == {}
    assert await store.get_raw(ipam_ip_key(POOL, addr)) is None
    wait_until(lambda: not node.veths(), 30, "the veth pair to go")
    assert "eth0" not in pod_links(node, pod)
    # DEL is idempotent, also for an unknown container and without a netns.
    rc, out = node.libcni("del", "ctr-a", pod)
    assert rc == 0, out
    rc, out = node.plugin("corral-cni", "DEL", conf(), cid="never-added", pod="")
    assert rc == 0, out
    # The shim installed is the one asked for: a script or an ELF binary.
    head = (node.bin_dir / "corral-cni").read_bytes()[:4]
    assert head == (b"\x7fELF" if node.shim == "native" else b"#!/u")


async def test_two_pods_talk_and_del_with_netns_gone(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    a, b = node.pod(), node.pod()
    rc, ra = node.libcni("add", "ctr-1", a)
    assert rc == 0, ra
    rc, rb = node.libcni("add", "ctr-2", b)
    assert rc == 0, rb
    ip_a, ip_b = (r["ips"][0]["address"].split("/")[0] for r in (ra, rb))
    assert ip_a != ip_b
    assert netns.run(a, ["ping", "-c1", "-W5", ip_b], check=False).returncode == 0
    # The runtime removed the pod's namespace before DEL: DEL still succeeds and frees.
    node.remove_pod(b)
    rc, out = node.libcni("del", "ctr-2", b)
    assert rc == 0, out
    assert ip_b not in await allocations(store)
    rc, out = node.libcni("del", "ctr-1", a)
    assert rc == 0, out
    assert await allocations(store) == {}
    wait_until(lambda: not node.veths(), 30, "the veth pairs to go")


async def test_result_shape_follows_cni_version(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pod = node.pod()
    rc, res = node.plugin("corral-cni", "ADD", conf(cniVersion="0.3.1"), cid="v031", pod=pod)
    assert rc == 0, res
    assert res["cniVersion"] == "0.3.1" and res["ips"][0]["version"] == "4"
    rc, res = node.plugin(
        "corral-cni", "ADD", conf(cniVersion="1.1.0"), cid="v110", pod=pod, ifname="net1"
    )
    assert rc == 0, res
    assert res["cniVersion"] == "1.1.0" and "version" not in res["ips"][0]
    # CHECK is not part of 0.3.x.
    rc, err = node.plugin("corral-cni", "CHECK", conf(cniVersion="0.3.1"), cid="v031", pod=pod)
    assert rc == 1 and err["code"] == 1
    for cid, ifn in (("v031", "eth0"), ("v110", "net1")):
        rc, _ = node.plugin("corral-cni", "DEL", conf(), cid=cid, pod=pod, ifname=ifn)
        assert rc == 0
    assert await allocations(store) == {}


async def test_config_options(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pod = node.pod()
    c = conf(
        bridge="br-test",
        mtu=1300,
        hairpinMode=False,
        isGateway=False,
        ipam={
            "type": "corral-ipam",
            "ranges": [
                [
                    {
                        "subnet": "10.244.250.0/24",
                        "rangeStart": "10.244.250.100",
                        "rangeEnd": "10.244.250.110",
                        "gateway": "10.244.250.254",
                    }
                ]
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "172.30.0.0/16", "gw": "10.244.250.253"}],
        },
    )
    rc, res = node.plugin("corral-cni", "ADD", c, cid="opts", pod=pod)
    assert rc == 0, res
    assert res["ips"][0]["address"] == "10.244.250.100/24"
    assert res["ips"][0]["gateway"] == "10.244.250.254"
    assert {"dst": "172.30.0.0/16", "gw": "10.244.250.253"} in res["routes"]
    nl = node.links()
    assert nl["br-test"]["addrs"] == []  # not the gateway
    host = res["interfaces"][1]["name"]
    assert nl[host]["master"] == nl["br-test"]["index"] and nl[host]["mtu"] == 1300
    assert pod_links(node, pod)["eth0"]["mtu"] == 1300
    assert node.hairpin()[nl[host]["index"]] == 0
    rc, out = node.plugin("corral-cni", "CHECK", dict(c, prevResult=res), cid="opts", pod=pod)
    assert rc == 0, out
    assert await allocations(store, "10.244.250.0-24") == {"10.244.250.100": "opts"}
    rc, _ = node.plugin("corral-cni", "DEL", c, cid="opts", pod=pod)
    assert rc == 0
    assert await allocations(store, "10.244.250.0-24") == {}


async def test_ip_masq_rule(cni_node: CNINode) -> None:
    node = cni_node
    pod = node.pod()
    rc, res = node.plugin("corral-cni", "ADD", conf(ipMasq=True), cid="masq", pod=pod)
    assert rc == 0, res
    rules = netns.run(node.name, ["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
    assert "-s 10.244.1.0/24 ! -d 10.244.0.0/16" in rules and "MASQUERADE" in rules


async def test_requested_ips(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pod = node.pod()
    rc, res = node.plugin(
        "corral-cni",
        "ADD",
        conf(),
        cid="want-a",
        pod=pod,
        env={"CNI_ARGS": "IgnoreUnknown=1;IP=10.244.1.77"},
    )
    assert rc == 0, res
    assert res["ips"][0]["address"] == "10.244.1.77/24"
    c = conf(args={"cni": {"ips": ["10.244.1.78"]}})
    rc, res = node.plugin("corral-cni", "ADD", c, cid="want-b", pod=pod, ifname="net1")
    assert rc == 0, res
    assert res["ips"][0]["address"] == "10.244.1.78/24"
    c = conf(runtimeConfig={"ips": ["10.244.1.79/24"]})
    rc, res = node.plugin("corral-cni", "ADD", c, cid="want-c", pod=pod, ifname="net2")
    assert rc == 0, res
    assert res["ips"][0]["address"] == "10.244.1.79/24"
    before = await allocations(store)
    # Taken, outside the range, or the gateway: a clear error and nothing changes.
    for args, code in (
        ("IP=10.244.1.77", 101),
        ("IP=10.9.9.9", 101),
        ("IP=10.244.1.1", 101),
        ("IP=not-an-ip", 4),
    ):
        p2 = node.pod()
        rc, err = node.plugin(
            "corral-cni", "ADD", conf(), cid="want-d", pod=p2, env={"CNI_ARGS": args}
        )
        assert rc == 1 and err["code"] == code, (args, err)
        assert "eth0" not in pod_links(node, p2)
    assert await allocations(store) == before
    assert len(node.veths()) == 3


async def test_gc_releases_all_but_valid(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pods = {cid: node.pod() for cid in ("keep", "drop-1", "drop-2")}
    for cid, pod in pods.items():
        rc, res = node.libcni("add", cid, pod)
        assert rc == 0, res
    assert len(await allocations(store)) == 3
    gc = dict(
        node.conflist()["plugins"][0],
        cniVersion="1.1.0",
        name="corral",
        **{"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]},
    )
    rc, out = node.plugin("corral-cni", "GC", gc)
    assert rc == 0, out
    assert set((await allocations(store)).values()) == {"keep"}
    assert len(node.veths()) == 1
    assert "eth0" in pod_links(node, pods["keep"])
    # GC without the list is refused rather than taken as "nothing is valid".
    rc, err = node.plugin(
        "corral-ipam", "GC", {k: v for k, v in gc.items() if k != "cni.dev/valid-attachments"}
    )
    assert rc == 1 and err["code"] == 7, err
    assert set((await allocations(store)).values()) == {"keep"}
    # corral-ipam on its own: GC with nothing valid frees everything.
    rc, out = node.plugin("corral-ipam", "GC", dict(gc, **{"cni.dev/valid-attachments": []}))
    assert rc == 0, out
    assert await allocations(store) == {}


async def test_status_and_add_wait_for_the_subnet(
    etcd: Any, libcni_client: str, store: Store
) -> None:
    node = CNINode(etcd.url, libcni_client)
    try:
        node.start()
        assert not (node.conf_dir / "10-corral.conflist").exists()
        rc, err = node.plugin("corral-cni", "STATUS", conf())
        assert rc == 1 and err["code"] == 50
        pod = node.pod()
        rc, err = node.plugin("corral-cni", "ADD", conf(), cid="early", pod=pod)
        assert rc == 1 and err["code"] == 11
        assert await allocations(store) == {} and not node.veths()
        node.write_subnet("10.244.9.0/24", mtu=1400, ip_masq=False)
        wait_until(lambda: (node.conf_dir / "10-corral.conflist").exists(), 30, "conflist")
        main = node.conflist()["plugins"][0]
        assert main["type"] == "corral-cni" and main["mtu"] == 1400 and main["ipMasq"] is True
        assert os.stat(node.socket).st_mode & 0o777 == 0o600
        rc, out = node.plugin("corral-cni", "STATUS", conf())
        assert rc == 0, out
        rc, res = node.libcni("add", "late", pod)
        assert rc == 0, res
        assert res["ips"][0]["address"].startswith("10.244.9.")
        rc, _ = node.libcni("del", "late", pod)
        assert rc == 0
    finally:
        node.cleanup()


@pytest.mark.parametrize("shim", ["python", "native"])
async def test_daemon_absent(etcd: Any, libcni_client: str, shim: str) -> None:
    node = CNINode(etcd.url, libcni_client, shim)
    try:
        node.start()
        node.stop()
        # The shims stay installed; with no daemon they answer at once.
        pod = node.pod()
        rc, out = node.plugin("corral-cni", "VERSION", {"cniVersion": "0.4.0"})
        assert rc == 0 and out["cniVersion"] == "0.4.0" and "1.1.0" in out["supportedVersions"]
        for cmd, code in (("ADD", 11), ("DEL", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)):
            rc, err = node.plugin("corral-cni", cmd, conf(), cid="x", pod=pod)
            assert rc == 1 and err["code"] == code, (cmd, err)
            assert "not answering" in err["msg"]
        rc, err = node.plugin("corral-ipam", "ADD", conf(), cid="x", pod=pod)
        assert rc == 1 and err["code"] == 11
    finally:
        node.cleanup()


BAD = [
    # (what, plugin, stdin, env overrides, code)
    ("malformed JSON", "{not json", {}, 6),
    ("unknown cniVersion", {"cniVersion": "9.9.9", "name": "n", "type": "corral-cni"}, {}, 1),
    ("missing CNI_COMMAND", None, {"CNI_COMMAND": None}, 4),
    ("unknown CNI_COMMAND", None, {"CNI_COMMAND": "FROB"}, 4),
    ("missing CNI_CONTAINERID", None, {"CNI_CONTAINERID": None}, 4),
    ("odd container ID", None, {"CNI_CONTAINERID": "a b;$(x)"}, 4),
    ("ifname too long", None, {"CNI_IFNAME": "a" * 16}, 4),
    ("ifname with /", None, {"CNI_IFNAME": "eth/0"}, 4),
    ("ifname ..", None, {"CNI_IFNAME": ".."}, 4),
    ("netns missing", None, {"CNI_NETNS": None}, 4),
    ("netns not a namespace", None, {"CNI_NETNS": "/etc/hostname"}, 4),
    ("bad CNI_ARGS", None, {"CNI_ARGS": "novalue"}, 4),
    ("mtu out of range", conf(mtu=10), {}, 7),
    ("bridge name bad", conf(bridge="x" * 20), {}, 7),
    ("wrong type", conf(type="bridge"), {}, 7),
    ("other IPAM", conf(ipam={"type": "host-local"}), {}, 2),
    ("range not a CIDR", conf(ipam={"type": "corral-ipam", "ranges": [[{"subnet": "x"}]]}), {}, 7),
    (
        "range IPv6",
        conf(ipam={"type": "corral-ipam", "ranges": [[{"subnet": "fd00::/64"}]]}),
        {},
        2,
    ),
    # A pod may only get an address the overlay routes to it: never a node's.
    (
        "range outside the cluster network",
        conf(ipam={"type": "corral-ipam", "ranges": [[{"subnet": "10.250.0.0/24"}]]}),
        {},
        7,
    ),
    ("name empty", conf(name=""), {}, 7),
    ("name missing", {k: v for k, v in conf().items() if k != "name"}, {}, 7),
    ("name with a slash", conf(name="../etc"), {}, 7),
    ("stdin over 1 MiB", conf(pad="x" * (1024 * 1024 + 1)), {}, 6),
    ("nested 65 deep", json.dumps({**conf(), "x": json.loads("[" * 65 + "]" * 65)}), {}, 6),
    ("nested past Python's limit", '{"x": ' + "[" * 100000 + "]" * 100000 + "}", {}, 6),
]


@pytest.mark.parametrize(("what", "stdin", "env", "code"), BAD, ids=[b[0] for b in BAD])
async def test_bad_input_changes_nothing(
    shared_cni_node: CNINode, store: Store, what: str, stdin: Any, env: dict[str, Any], code: int
) -> None:
    node = shared_cni_node
    pod = node.pod()
    rc, err = node.plugin(
        "corral-cni", "ADD", conf() if stdin is None else stdin, cid="bad-1", pod=pod, env=env
    )
    assert rc == 1, err
    assert err["code"] == code, err
    assert err["msg"]
    assert await allocations(store) == {}
    assert node.veths() == []
    assert set(pod_links(node, pod)) == {"lo"}


async def test_repeated_add_keeps_the_granted_ip(cni_node: CNINode, store: Store) -> None:
    """A second ADD of the same attachment (no DEL between) gets the IP etcd already
    granted it, though the allocator first picks a fresh one, and leaves one pair."""
    node = cni_node
    pod = node.pod()
    rc, first = node.libcni("add", "again", pod)
    assert rc == 0, first
    rc, second = node.plugin("corral-cni", "ADD", conf(), cid="again", pod=pod)
    assert rc == 0, (second, node.log())
    addr = first["ips"][0]["address"]
    assert second["ips"][0]["address"] == addr
    assert pod_links(node, pod)["eth0"]["addrs"] == [addr]
    assert node.default_gateways(pod) == ["10.244.1.1"]
    assert await allocations(store) == {addr.split("/")[0]: "again"}
    assert len(node.veths()) == 1
    assert netns.run(pod, ["ping", "-c1", "-W5", "10.244.1.1"], check=False).returncode == 0
    rc, out = node.libcni("del", "again", pod)
    assert rc == 0, out
    assert await allocations(store) == {}


async def test_existing_interface_changes_nothing(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pod = node.pod()
    netns.run(
        os.path.basename(pod),
        ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
    )
    rc, err = node.libcni("add", "clash", pod)
    assert rc == 1 and err["code"] == 100 and "already exists" in err["msg"], err
    assert await allocations(store) == {}
    assert node.veths() == []
    assert set(pod_links(node, pod)) == {"lo", "eth0", "eth0p"}


async def test_bridge_deleted_under_the_daemon_is_made_again(cni_node: CNINode) -> None:
    node = cni_node
    pod1, pod2 = node.pod(), node.pod()
    rc, res = node.libcni("add", "br-1", pod1)
    assert rc == 0, res
    netns.run(node.name, ["ip", "link", "del", "cni0"])
    rc, res = node.libcni("add", "br-2", pod2)
    assert rc == 0, (res, node.log())
    nl = node.links()
    assert "10.244.1.1/24" in nl["cni0"]["addrs"]
    assert nl[res["interfaces"][1]["name"]]["master"] == nl["cni0"]["index"]
    assert netns.run(pod2, ["ping", "-c1", "-W5", "10.244.1.1"], check=False).returncode == 0


@pytest.mark.parametrize("cni_node", ["python", "native"], indirect=True)
async def test_shim_forwards_stdin_and_env_faithfully(cni_node: CNINode) -> None:
    node = cni_node
    # No CNI_* variable at all: the daemon still gets stdin and names what is missing.
    none = dict.fromkeys(("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"))
    rc, err = node.plugin("corral-cni", "ADD", conf(), env=none)
    assert rc == 1 and err["code"] == 4 and "CNI_COMMAND" in err["msg"], err
    # Large stdin, K8S_ args and odd bytes make it through.
    big = conf(dns={"search": ["x" * 100] * 500}, cniVersion="1.1.0")
    pod = node.pod()
    rc, res = node.plugin(
        "corral-cni",
        "ADD",
        big,
        cid="big",
        pod=pod,
        env={"CNI_ARGS": "K8S_POD_NAME=p1;K8S_POD_NAMESPACE=ns1"},
    )
    assert rc == 0, res
    assert res["dns"]["search"] == ["x" * 100] * 500
    rc, _ = node.plugin("corral-cni", "DEL", big, cid="big", pod=pod)
    assert rc == 0


async def test_del_releases_even_after_the_lease_is_gone(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pod = node.pod()
    rc, res = node.plugin("corral-cni", "ADD", conf(), cid="orphan", pod=pod)
    assert rc == 0, res
    (node.run_dir / "subnet.json").unlink()
    # No prevResult, no ranges, no node subnet: DEL still finds and frees the IP.
    rc, out = node.plugin("corral-cni", "DEL", conf(), cid="orphan", pod=pod)
    assert rc == 0, out
    assert await allocations(store) == {}
    wait_until(lambda: not node.veths(), 30, "the veth pair to go")


async def test_etcd_down_means_try_again_later(libcni_client: str, tmp_path: Any) -> None:
    from corral.cluster.etcd import LocalEtcd

    own = LocalEtcd(data_dir=str(tmp_path / "etcd"), log_path=str(tmp_path / "etcd.log"))
    own.start()
    node = CNINode(own.url, libcni_client)
    try:
        node.write_subnet()
        node.start()
        pod = node.pod()
        rc, out = node.plugin("corral-cni", "STATUS", conf())
        assert rc == 0, out
        own.stop()
        rc, err = node.plugin("corral-cni", "STATUS", conf())
        assert rc == 1 and err["code"] == 50, err
        rc, err = node.plugin("corral-cni", "ADD", conf(), cid="no-etcd", pod=pod)
        assert rc == 1 and err["code"] == 11, err
        wait_until(lambda: not node.veths(), 30, "the half-made pair to go")
        assert set(node.links(pod)) == {"lo"}
    finally:
        node.cleanup()
        own.stop()


def http_code(pod: str, url: str) -> str:
    """curl from inside a pod: the HTTP status, or 000 when nothing answered."""
    return netns.run(
        os.path.basename(pod),
        ["curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", url],
        check=False,
    ).stdout


async def test_hairpin_lets_a_pod_reach_itself_through_a_service(cni_node: CNINode) -> None:
    """kube-proxy-shaped DNAT of a VIP back to the caller works only with hairpinMode."""
    node = cni_node
    netns.run(
        node.name, ["sysctl", "-w", "net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"]
    )
    for hairpin in (True, False):
        pod = node.pod()
        rc, res = node.plugin(
            "corral-cni", "ADD", conf(hairpinMode=hairpin), cid=f"hp-{hairpin}", pod=pod
        )
        assert rc == 0, res
        ip = res["ips"][0]["address"].split("/")[0]
        nat = [
            [
                "PREROUTING",
                "-d",
                "10.96.0.77",
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                f"{ip}:8080",
            ],
            ["POSTROUTING", "-s", ip, "-d", ip, "-j", "MASQUERADE"],
        ]
        for rule in nat:
            netns.run(node.name, ["iptables", "-t", "nat", "-A", *rule])
        server = subprocess.Popen(
            netns.command(
                os.path.basename(pod), [sys.executable, "-m", "http.server", "8080", "--bind", ip]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            direct = f"http://{ip}:8080/"
            wait_until(lambda u=direct, p=pod: http_code(p, u) == "200", 30, "the pod's server")
            assert (http_code(pod, "http://10.96.0.77/") == "200") is hairpin
        finally:
            server.terminate()
            server.wait(10)
            for rule in nat:
                netns.run(node.name, ["iptables", "-t", "nat", "-D", *rule])


async def test_del_of_the_last_pod_in_a_range_removes_its_gateway(cni_node: CNINode) -> None:
    node = cni_node
    c = conf(
        bridge="br-gw",
        ipam={"type": "corral-ipam", "ranges": [[{"subnet": "10.244.249.0/24"}]]},
    )
    pods = {cid: node.pod() for cid in ("gw-a", "gw-b")}
    for cid, pod in pods.items():
        rc, res = node.plugin("corral-cni", "ADD", c, cid=cid, pod=pod)
        assert rc == 0, res
    assert node.links()["br-gw"]["addrs"] == ["10.244.249.1/24"]
    rc, out = node.plugin("corral-cni", "DEL", c, cid="gw-a", pod=pods["gw-a"])
    assert rc == 0, out
    assert node.links()["br-gw"]["addrs"] == ["10.244.249.1/24"]  # gw-b still uses it
    rc, out = node.plugin("corral-cni", "DEL", c, cid="gw-b", pod=pods["gw-b"])
    assert rc == 0, out
    assert node.links()["br-gw"]["addrs"] == []
    # The node's own subnet keeps its gateway on cni0 whatever pods come and go.
    rc, res = node.plugin("corral-cni", "ADD", conf(), cid="own", pod=node.pod())
    assert rc == 0, res
    rc, out = node.plugin("corral-cni", "DEL", conf(), cid="own", pod="")
    assert rc == 0, out
    assert "10.244.1.1/24" in node.links()["cni0"]["addrs"]


def test_socket_removed_or_replaced_is_served_again(cni_node: CNINode) -> None:
    """What a user or a cleanup script can do to the socket path; the daemon recovers."""
    os.unlink(cni_node.socket)
    wait_until(cni_node._answers, 30, "the CNI socket served again after rm")
    assert "was removed or replaced" in cni_node.log()

    os.unlink(cni_node.socket)  # now something else takes the path: restarts fail ...
    os.mkdir(cni_node.socket)
    try:
        wait_until(lambda: "is in the way" in cni_node.log(), 30, "the component to fail")
        assert cni_node.proc is not None and cni_node.proc.poll() is None  # ... daemon lives
    finally:
        os.rmdir(cni_node.socket)
    wait_until(cni_node._answers, 60, "the CNI socket served again once the path was free")
    pod = cni_node.pod()
    rc, res = cni_node.libcni("add", "ctr-sock", pod)
    assert rc == 0, (res, cni_node.log())
    assert cni_node.libcni("del", "ctr-sock", pod)[0] == 0


async def test_add_guards_the_pod_source_with_an_explicit_extra_prefix_opt_in(
    cni_node: CNINode, store: Store
) -> None:
    """ADD lets the pod send only from its own IP and MAC before it returns; CNI_ARGS
    CORRAL_EXTRA_SOURCE adds one prefix inside the cluster network, anything else is error 4."""
    node = cni_node
    pod = node.pod()
    rc, res = node.plugin("corral-cni", "ADD", conf(), cid="guard-a", pod=pod)
    assert rc == 0, res
    host, mac = res["interfaces"][1]["name"], res["interfaces"][2]["mac"]
    ip = res["ips"][0]["address"].split("/")[0]
    saved = podguard.read(node.name)
    assert saved.rules[podguard.POD_CHAIN_PREFIX + host] == podguard.pod_rules(
        podguard.PodSource(host, ip, mac)
    )
    assert saved.rules[podguard.CHAIN] == [f"-i {host} -j {podguard.POD_CHAIN_PREFIX}{host}"]
    assert f"-j {podguard.CHAIN}" in saved.rules["PREROUTING"]

    p2 = node.pod()
    extra = {"CNI_ARGS": "IgnoreUnknown=1;CORRAL_EXTRA_SOURCE=10.244.1.128/25"}
    rc, res = node.plugin("corral-cni", "ADD", conf(), cid="guard-b", pod=p2, env=extra)
    assert rc == 0, res
    host2 = res["interfaces"][1]["name"]
    assert node.links()[host2]["ifalias"].endswith(" 10.244.1.128/25")
    rules = podguard.read(node.name).rules[podguard.POD_CHAIN_PREFIX + host2]
    assert f"-p IPv4 -s {res['interfaces'][2]['mac']} --ip-src 10.244.1.128/25 -j RETURN" in rules

    # DEL takes the pod's chain away with its veth
    rc, _ = node.plugin("corral-cni", "DEL", conf(), cid="guard-b", pod=p2)
    assert rc == 0
    wait_until(
        lambda: podguard.POD_CHAIN_PREFIX + host2 not in podguard.read(node.name).chains,
        what="the DEL's veth chain to go",
    )
    assert podguard.POD_CHAIN_PREFIX + host in podguard.read(node.name).chains

    before = await allocations(store)
    for bad in ("10.9.0.0/24", "10.244.1.5/25", "nonsense"):
        p3 = node.pod()
        env = {"CNI_ARGS": f"CORRAL_EXTRA_SOURCE={bad}"}
        rc, err = node.plugin("corral-cni", "ADD", conf(), cid="guard-c", pod=p3, env=env)
        assert rc == 1 and err["code"] == 4, (bad, err)
        assert "eth0" not in pod_links(node, p3)
    assert await allocations(store) == before
