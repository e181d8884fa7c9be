"""Interop both ways: the reference bridge plugin on corral-ipam, and corral-cni chained
with the reference portmap and loopback plugins, all through libcni."""

from __future__ import annotations

import json

from corral.api.store import Store
from corral.node import netns
from tests import cni_helpers
from tests.cni_helpers import CNINode, wait_until

cni_node = cni_helpers.cni_node
libcni_client = cni_helpers.libcni_client


async def ips_in(store: Store, pool: str) -> dict[str, str]:
    kvs, _ = await store.list_raw(f"/corral/v1/ipam/{pool}/ips/")
    return {kv.key.rsplit("/", 1)[1]: json.loads(kv.value)["containerID"] for kv in kvs}


async def test_reference_bridge_on_corral_ipam(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    conf_dir = node.write_conflist(
        "refnet",
        {
            "cniVersion": "1.0.0",
            "name": "refnet",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "refbr0",
                    "isGateway": True,
                    "ipam": {"type": "corral-ipam"},
                }
            ],
        },
    )
    pod = node.pod()
    rc, res = node.libcni("add", "ref-1", pod, conf_dir=conf_dir, net="refnet")
    assert rc == 0, (res, node.log())
    addr = res["ips"][0]["address"]
    assert addr.startswith("10.244.1.") and res["ips"][0]["gateway"] == "10.244.1.1"
    assert node.links(pod)["eth0"]["addrs"] == [addr]
    assert "10.244.1.1/24" in node.links()["refbr0"]["addrs"]
    assert await ips_in(store, "10.244.1.0-24") == {addr.split("/")[0]: "ref-1"}
    # bridge's CHECK asks corral-ipam to CHECK the allocation too.
    rc, out = node.libcni("check", "ref-1", pod, conf_dir=conf_dir, net="refnet")
    assert rc == 0, out
    rc, out = node.libcni("del", "ref-1", pod, conf_dir=conf_dir, net="refnet")
    assert rc == 0, out
    assert await ips_in(store, "10.244.1.0-24") == {}
    assert "eth0" not in node.links(pod)
    # Explicit ranges work the same under the reference plugin.
    conf_dir = node.write_conflist(
        "refnet2",
        {
            "cniVersion": "0.4.0",
            "name": "refnet2",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "refbr1",
                    "isGateway": True,
                    "ipam": {
                        "type": "corral-ipam",
                        "ranges": [[{"subnet": "10.244.251.0/24", "rangeStart": "10.244.251.50"}]],
                    },
                }
            ],
        },
    )
    rc, res = node.libcni("add", "ref-2", pod, conf_dir=conf_dir, net="refnet2")
    assert rc == 0, res
    assert res["ips"][0]["address"] == "10.244.251.50/24"
    rc, out = node.libcni("del", "ref-2", pod, conf_dir=conf_dir, net="refnet2")
    assert rc == 0, out
    assert await ips_in(store, "10.244.251.0-24") == {}


async def test_corral_cni_chained_with_portmap_and_loopback(
    cni_node: CNINode, store: Store
) -> None:
    node = cni_node
    conf_dir = node.write_conflist(
        "chain",
        {
            "cniVersion": "1.0.0",
            "name": "chain",
            "plugins": [
                {"type": "corral-cni", "ipam": {"type": "corral-ipam"}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "loopback"},
            ],
        },
    )
    pod = node.pod()
    caps = json.dumps(
        {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}
    )
    rc, res = node.libcni(
        "add", "chain-1", pod, conf_dir=conf_dir, net="chain", env={"CAP_ARGS": caps}
    )
    assert rc == 0, (res, node.log())
    # Our result came through both reference plugins unchanged.
    addr = res["ips"][0]["address"]
    assert addr.startswith("10.244.1.") and res["interfaces"][2]["name"] == "eth0"
    pod_ip = addr.split("/")[0]
    nat = netns.run(node.name, ["iptables-save", "-t", "nat"]).stdout
    assert "CNI-HOSTPORT-DNAT" in nat and f"{pod_ip}:80" in nat, nat
    assert node.links(pod)["lo"]["up"]
    # The chain's CHECK cannot pass: portmap 1.1.1 also checks IPv6 rules it never made
    # (containernetworking/plugins#819). corral-cni's own CHECK on the chain result:
    check = {
        "cniVersion": "1.0.0",
        "name": "chain",
        "type": "corral-cni",
        "ipam": {"type": "corral-ipam"},
        "prevResult": res,
    }
    rc, out = node.plugin("corral-cni", "CHECK", check, cid="chain-1", pod=pod)
    assert rc == 0, out
    rc, out = node.libcni(
        "del", "chain-1", pod, conf_dir=conf_dir, net="chain", env={"CAP_ARGS": caps}
    )
    assert rc == 0, out
    nat = netns.run(node.name, ["iptables-save", "-t", "nat"]).stdout
    assert f"{pod_ip}:80" not in nat
    assert await ips_in(store, "10.244.1.0-24") == {}
    wait_until(lambda: not node.veths(), 30, "the veth pair to go")
