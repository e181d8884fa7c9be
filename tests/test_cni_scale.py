"""Many ADDs at once on one node, and a daemon killed in the middle of them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

from corral.api.store import Store
from corral.cni.bridge import host_veth_name
from tests import cni_helpers
from tests.cni_helpers import CNINode, wait_until
from tests.etcd_helpers import running_etcd

cni_node = cni_helpers.cni_node
libcni_client = cni_helpers.libcni_client
POOL = "10.244.1.0-24"


async def allocations(store: Store) -> dict[str, tuple[str, str]]:
    """ip -> (containerID, ifname) for every IP key of the node's pool."""
    kvs, _ = await store.list_raw(f"/corral/v1/ipam/{POOL}/ips/")
    out = {}
    for kv in kvs:
        rec = json.loads(kv.value)
        out[kv.key.rsplit("/", 1)[1]] = (rec["containerID"], rec["ifname"])
    return out


async def owners(store: Store) -> dict[tuple[str, str], str]:
    prefix = f"/corral/v1/ipam/{POOL}/owners/"
    kvs, _ = await store.list_raw(prefix)
    return {tuple(kv.key[len(prefix) :].split("/")): kv.value.decode() for kv in kvs}


async def test_100_parallel_adds_then_dels(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pods = {f"par-{i}": node.pod() for i in range(100)}
    results = await asyncio.gather(*(node.alibcni("add", cid, pod) for cid, pod in pods.items()))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]][:3]
    ips = [res["ips"][0]["address"] for _, res in results]
    assert len(set(ips)) == 100, "an IP was handed out twice"
    allocs = await allocations(store)
    assert len(allocs) == 100
    assert {cid for cid, _ in allocs.values()} == set(pods)
    assert {f"{ip}/24" for ip in allocs} == set(ips)
    assert len(await owners(store)) == 100
    assert len(node.veths()) == 100
    # Every pod holds exactly the address its result names.
    for (_, res), (cid, pod) in zip(results, pods.items(), strict=True):
        if cid.endswith("7"):  # a sample keeps this quick
            assert node.links(pod)["eth0"]["addrs"] == [res["ips"][0]["address"]]

    results = await asyncio.gather(*(node.alibcni("del", cid, pod) for cid, pod in pods.items()))
    assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]][:3]
    assert await allocations(store) == {}
    assert await owners(store) == {}
    wait_until(lambda: not node.veths(), 60, "all veth pairs to go")


async def test_daemon_killed_mid_adds_then_gc(cni_node: CNINode, store: Store) -> None:
    node = cni_node
    pods = {f"crash-{i}": node.pod() for i in range(40)}
    calls = {cid: asyncio.create_task(node.alibcni("add", cid, pod)) for cid, pod in pods.items()}
    deadline = asyncio.get_running_loop().time() + 120
    while len(await allocations(store)) < 8:
        assert asyncio.get_running_loop().time() < deadline, node.log()
        await asyncio.sleep(0.01)
    node.stop(signal.SIGKILL)
    done = await asyncio.gather(*calls.values())
    ok = {cid for cid, (rc, _) in zip(calls, done, strict=True) if rc == 0}
    failed = set(pods) - ok
    assert failed, "the kill came too late to interrupt anything"
    for rc, err in done:
        if rc != 0:
            assert err["code"] == 11, err  # try again later, as a runtime expects

    # Restart; the runtime garbage-collects with the attachments it knows are live.
    node.start()
    gc = dict(
        node.conflist()["plugins"][0],
        cniVersion="1.1.0",
        name="corral",
        **{"cni.dev/valid-attachments": [{"containerID": c, "ifname": "eth0"} for c in sorted(ok)]},
    )
    rc, out = node.plugin("corral-cni", "GC", gc)
    assert rc == 0, out
    allocs = await allocations(store)
    assert {cid for cid, _ in allocs.values()} == ok
    assert {(cid, "eth0") for cid in ok} == set(await owners(store))
    assert node.veths() == sorted(host_veth_name(c, "eth0") for c in ok)
    for cid in failed:
        assert "eth0" not in node.links(pods[cid]), cid
    # What survived still works, and the freed IPs are handed out again.
    for cid in ok:
        rc, out = node.libcni("check", cid, pods[cid])
        assert rc == 0, (cid, out)
    retry = sorted(failed)[0]
    rc, res = node.libcni("add", retry, pods[retry])
    assert rc == 0, res
    assert res["ips"][0]["address"].split("/")[0] not in allocs


async def test_two_nodes_sharing_a_range_never_share_an_ip(
    cni_node: CNINode, etcd: object, libcni_client: str, store: Store
) -> None:
    """Explicit `ranges` shared by two nodes: etcd's create-if-absent keeps IPs unique."""
    other = CNINode(cni_node.etcd_url, libcni_client)
    try:
        other.write_subnet("10.244.2.0/24")
        other.start()
        shared = {
            "cniVersion": "1.0.0",
            "name": "shared",
            "plugins": [
                {
                    "type": "corral-cni",
                    "bridge": "shr0",
                    "ipam": {
                        "type": "corral-ipam",
                        "ranges": [
                            [
                                {
                                    "subnet": "10.244.252.0/24",
                                    "rangeStart": "10.244.252.10",
                                    "rangeEnd": "10.244.252.49",
                                }
                            ]
                        ],
                    },
                }
            ],
        }
        dirs = {n.name: n.write_conflist("shared", shared) for n in (cni_node, other)}

        async def add(node: CNINode, cid: str) -> tuple[int, object]:
            pod = node.pod()
            return await asyncio.to_thread(
                node.libcni, "add", cid, pod, conf_dir=dirs[node.name], net="shared"
            )

        calls = [add(n, f"{n.name}-{i}") for i in range(20) for n in (cni_node, other)]
        results = await asyncio.gather(*calls)
        assert all(rc == 0 for rc, _ in results), [r for r in results if r[0]][:3]
        ips = [res["ips"][0]["address"] for _, res in results]
        assert len(set(ips)) == 40, "two containers got the same IP"
        kvs, _ = await store.list_raw("/corral/v1/ipam/10.244.252.0-24/ips/")
        assert len(kvs) == 40
        # The range is full now: the next ADD says so and changes nothing.
        rc, err = await add(cni_node, "one-too-many")
        assert rc == 1 and err["code"] == 102, err
        kvs, _ = await store.list_raw("/corral/v1/ipam/10.244.252.0-24/ips/")
        assert len(kvs) == 40
    finally:
        other.cleanup()


async def test_adds_while_etcd_drops_out_complete_or_leave_nothing(libcni_client: str) -> None:
    """Sequential ADDs while etcd is frozen, then stopped and restarted under the daemon
    (its calls time out or are refused, its watches reconnect): each ADD either
    succeeds whole, or fails with 11 and leaves no address, no owner record and no
    interface."""
    with running_etcd("cni-faults") as own:
        node = CNINode(own.url, libcni_client)
        try:
            node.write_subnet()
            node.start()
            stop = asyncio.Event()

            async def flap() -> None:
                assert own.record is not None
                loop = asyncio.get_running_loop()
                await asyncio.sleep(0.2)  # frozen longer than one request's timeout ...
                os.kill(own.record.pid, signal.SIGSTOP)
                await asyncio.sleep(7.0)
                os.kill(own.record.pid, signal.SIGCONT)
                for _ in range(2):  # ... then gone (refused) for a while, twice
                    await asyncio.sleep(0.3)
                    await loop.run_in_executor(None, own.stop)
                    await asyncio.sleep(2.0)
                    await loop.run_in_executor(None, own.start)

            flapper = asyncio.create_task(flap())
            results: dict[str, tuple[int, Any]] = {}
            pods: dict[str, str] = {}
            try:
                for i in range(40):
                    cid = f"flap-{i}"
                    pods[cid] = node.pod()
                    results[cid] = await node.alibcni("add", cid, pods[cid])
            finally:
                stop.set()
                await flapper
            ok = {cid for cid, (rc, _) in results.items() if rc == 0}
            assert ok and len(ok) < len(results), "the freezes hit no ADD, or every ADD"
            for cid, (rc, err) in results.items():
                if rc != 0:
                    assert err["code"] == 11, (cid, err)
            async with Store(own.url) as store:
                kvs, _ = await store.list_raw(f"/corral/v1/ipam/{POOL}/ips/")
                held = {json.loads(kv.value)["containerID"] for kv in kvs}
                assert held == ok, f"allocations {sorted(held - ok)} without a successful ADD"
                assert {cid for cid, _ in await owners(store)} == ok
            wait_until(
                lambda: node.veths() == sorted(host_veth_name(c, "eth0") for c in ok),
                60,
                "only the successful ADDs' veths",
            )
            for cid in set(pods) - ok:
                assert "eth0" not in node.links(pods[cid]), cid
        finally:
            node.cleanup()
