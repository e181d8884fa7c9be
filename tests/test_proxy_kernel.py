"""The iptables mode and the core against real kernel state and a real etcd.

Kernel cases run in a scratch network namespace made and removed here; the
tracker case uses the session's etcd through the shared informers.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from corral.api.informer import InformerFactory
from corral.api.objects import EndpointSlice, Service
from corral.api.store import Store
from corral.node import netns
from corral.proxy import rules as R
from corral.proxy.core import EndpointInfo, ServicePort, ServiceTracker, ServiceView
from corral.proxy.iptables import IptablesMode, Netfilter

CIDR = "10.244.0.0/16"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture
def ns(scratch_ns: str) -> str:
    return scratch_ns


def sh(ns: str, *argv: str) -> str:
    return subprocess.run(
        netns.command(ns, list(argv)), capture_output=True, text=True, check=False
    ).stdout


def view(sp: ServicePort, n: int) -> ServiceView:
    eps = tuple(EndpointInfo(f"10.244.1.{i + 2}", 8080) for i in range(n))
    return ServiceView((sp,), ((sp.key, eps),) if eps else ())


@needs_root
def test_sync_canary_repair_and_cleanup(ns: str) -> None:
    a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80, node_port=30001, affinity_timeout=9)
    b = ServicePort("default/b", "", "UDP", "10.96.0.2", 53)
    mode = IptablesMode(CIDR, Netfilter(ns))
    views = {"default/a": view(a, 3), "default/b": view(b, 0)}
    assert mode.sync(False, views, set()).full  # the first sync is full whatever was asked
    nat = sh(ns, "iptables-save", "-t", "nat")
    assert f"-A {R.bucket_chain(1)} -d 10.96.0.1/32" in nat and "--dport 30001" in nat
    assert f"-A {R.SERVICES} -d 0.0.0.1/0.0.0.255 -j {R.bucket_chain(1)}" in nat
    assert '-A PREROUTING -m comment --comment "corral: service portals"' in nat
    assert "default/b has no endpoints" in sh(ns, "iptables-save", "-t", "filter")
    assert sh(ns, "ipset", "list", "-n").split() == sorted(
        R.affinity_set(a, e) for e in view(a, 3).endpoints_of(a)
    )
    assert mode.canary_ok()
    # a second full sync changes nothing and adds no duplicate hooks, also after the
    # affinity timeout changed (the sets stay; new entries get the new timeout)
    a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80, node_port=30001, affinity_timeout=4)
    views["default/a"] = view(a, 3)
    mode.sync(False, views, {"default/a"})
    assert "--timeout 4" in sh(ns, "iptables-save", "-t", "nat")
    mode.sync(True, views, set())
    assert sh(ns, "iptables-save", "-t", "nat").count("-A PREROUTING") == 1
    # flushed by hand: the canary says so; the repairing full sync restores everything
    sh(ns, "iptables", "-t", "nat", "-F")
    assert not mode.canary_ok()
    mode.forget_kernel()
    mode.sync(True, views, set())
    assert mode.canary_ok()
    assert sh(ns, "iptables-save", "-t", "nat").count("-A PREROUTING") == 1
    # a service going away takes its chains and sets
    del views["default/a"]
    mode.sync(False, views, {"default/a"})
    nat = sh(ns, "iptables-save", "-t", "nat")
    assert R.SVC_PREFIX not in nat and R.SEP_PREFIX not in nat
    assert sh(ns, "ipset", "list", "-n").strip() == ""
    # cleanup leaves nothing of ours
    views["default/a"] = view(a, 2)
    mode.sync(False, views, {"default/a"})
    r = subprocess.run(
        netns.command(ns, [sys.executable, "-m", "corral", "proxy", "--cleanup", "--node", ns]),
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "removed nat chain CORRAL-SERVICES" in r.stdout
    for table in ("nat", "filter"):
        assert "CORRAL-" not in sh(ns, "iptables-save", "-t", table)
    assert sh(ns, "ipset", "list", "-n").strip() == ""


async def test_tracker_views_and_coalesced_changes(store: Store) -> None:
    informers = InformerFactory(store)
    changes = []
    t = ServiceTracker(informers, lambda: changes.append(1))
    informers.start()
    try:
        await t.wait_synced()
        svc = Service(
            metadata={"name": "web", "namespace": "default"},
            spec={"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}]},
        )
        await store.create(svc)
        await store.create(
            EndpointSlice(
                metadata={
                    "name": "web",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                endpoints=[{"addresses": ["10.244.1.2"], "conditions": {"ready": True}}],
                ports=[{"name": "http", "port": 8080}],
            )
        )

        async def endpoints() -> tuple[EndpointInfo, ...]:
            for _ in range(100):
                v = t.view("default/web")
                if v is not None and v.endpoints:
                    return v.endpoints_of(v.ports[0])
                await asyncio.sleep(0.05)
            raise AssertionError("no view with endpoints")

        assert await endpoints() == (EndpointInfo("10.244.1.2", 8080),)
        taken = t.take()
        assert taken.changed == {"default/web"} and "default/web" in taken.since
        assert len(t) == 0 and changes
        # a change that does not matter to the data path (a label) records nothing
        got = await store.get(Service, "web", "default")
        assert got is not None
        got.metadata.labels["x"] = "y"
        await store.update(got)
        await asyncio.sleep(0.3)
        assert len(t) == 0
        await store.delete(Service, "web", "default")
        for _ in range(100):
            if t.view("default/web") is None:
                break
            await asyncio.sleep(0.05)
        assert t.view("default/web") is None and t.take().changed == {"default/web"}
    finally:
        t.remove()
        await informers.stop()
