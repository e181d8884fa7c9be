"""The overlay through an etcd outage: pods keep talking, agents wait it out and recover.

Uses an etcd of its own (the test stops it), so the session's etcd is untouched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from corral.api.store import Store, subnet_key
from corral.cluster.etcd import LocalEtcd
from corral.node import netlink
from corral.overlay import lease as leases
from tests.overlay_testbed import Testbed, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

DEADLINE = 45.0


@pytest.fixture
def private(request: pytest.FixtureRequest) -> Iterator[tuple[LocalEtcd, Testbed]]:
    """Two nodes on an etcd of their own; `@pytest.mark.parametrize("private", [resync],
    indirect=True)` sets the agents' full-pass period."""
    tmp = tempfile.mkdtemp(prefix="corral-test-overlay-etcd-")
    etcd = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    etcd.start()
    tb = None
    try:
        tb = Testbed(etcd.url, nodes=2, lease_ttl=6, resync=getattr(request, "param", 1.0))
        yield etcd, tb
    finally:
        if tb is not None:
            tb.close()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def holder(url: str, subnet: str) -> str | None:
    async def go() -> str | None:
        async with Store(url) as s:
            kv = await s.get_raw(subnet_key(subnet))
        rec = leases.decode(kv.value) if kv else None
        return rec.node_name if rec else None

    return asyncio.run(go())


def test_etcd_outage_keeps_pods_talking_and_agents_recover(
    private: tuple[LocalEtcd, Testbed],
) -> None:
    etcd, tb = private
    for i in (1, 2):
        tb.start_agent(i)
    p1, p2 = tb.add_pod(1), tb.add_pod(2)
    wait_for(lambda: tb.ping(p1, p2.ip), DEADLINE, "pods to talk")
    subnet2 = tb.node(2).subnet_info()["subnet"]

    etcd.stop()
    for i in (1, 2):
        wait_for(
            lambda i=i: "cannot renew the subnet lease" in tb.agent_log(i),
            DEADLINE,
            f"node-{i} to notice etcd is gone",
        )
    assert tb.ping(p1, p2.ip) and tb.ping(p2, p1.ip)  # the data path does not need etcd

    etcd.start()
    assert all(n.proc is not None and n.proc.poll() is None for n in tb.nodes)
    # the agents reconnected: a lease deleted now is taken back through the new watch
    asyncio.run(_delete(etcd.url, subnet_key(subnet2)))
    wait_for(
        lambda: holder(etcd.url, subnet2) == "node-2",
        DEADLINE,
        "node-2 to re-take its subnet after the outage",
    )
    assert tb.node(2).subnet_info()["subnet"] == subnet2
    wait_for(lambda: tb.ping(p1, p2.ip), DEADLINE, "pods to talk after the outage")


async def _delete(url: str, key: str) -> None:
    async with Store(url) as s:
        await s.delete_raw(key)


@pytest.mark.parametrize("private", [3600.0], indirect=True)
def test_netlink_events_trigger_repair_without_waiting(private: tuple[LocalEtcd, Testbed]) -> None:
    """With the periodic pass an hour away, only netlink events can explain a repair."""
    _, tb = private
    for i in (1, 2):
        tb.start_agent(i)
    wait_for(lambda: len(tb.snapshot(1)["routes"]) == 1, DEADLINE, "node-1 to route node-2")
    good = tb.snapshot(1)
    idx = good["device"]["index"]
    dst, gw, _, _ = good["routes"][0]
    mac, remote_ip = good["fdb"][0]
    with netlink.iproute(tb.node(1).ns) as ipr:
        ipr.route("del", dst=dst, gateway=gw, oif=idx)
    wait_for(lambda: tb.snapshot(1) == good, DEADLINE, "the route to come back")
    with netlink.iproute(tb.node(1).ns) as ipr:
        ipr.fdb("del", ifindex=idx, lladdr=mac, dst=remote_ip)
    wait_for(lambda: tb.snapshot(1) == good, DEADLINE, "the FDB entry to come back")
    with netlink.iproute(tb.node(1).ns) as ipr:
        ipr.link("set", index=idx, address="02:de:ad:be:ef:02")
    wait_for(lambda: tb.snapshot(1) == good, DEADLINE, "the VTEP MAC to be restored")
    with netlink.iproute(tb.node(1).ns) as ipr:
        ipr.link("del", index=idx)
    wait_for(
        lambda: (
            (s := tb.snapshot(1))["device"] is not None
            and len(s["routes"]) == 1
            and s["fdb"] == good["fdb"]
        ),
        DEADLINE,
        "the device to be recreated",
    )
