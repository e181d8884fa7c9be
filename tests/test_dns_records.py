"""Cluster DNS records against a real etcd: every record of the spec, negative answers,
TTLs, case, and the index following the watch (a server in this loop, dnspython)."""

from __future__ import annotations

import asyncio
import contextlib

import dns.asyncquery
import dns.flags
import dns.message
import dns.rdatatype

from corral.api.objects import Endpoints, EndpointSlice, NetworkConfig, PodCondition, Service
from corral.api.store import Store
from corral.clusterdns.server import DNSServer
from corral.control.endpoints import EndpointsController
from tests.dns_helpers import (
    ask,
    caught_up,
    dns_server,
    endpoint_slice,
    pod,
    rcode,
    service,
    soa_ttl,
    values,
)

SVC = "web.default.svc.cluster.local."


async def test_clusterip_service_records(store: Store) -> None:
    await store.create(
        service(
            "web",
            ip="10.96.0.20",
            ports=[
                {"name": "http", "port": 80},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        )
    )
    await store.create(service("plain", ip="10.96.0.21", ports=[{"port": 8080}]))
    async with dns_server(store, ttl=7) as server:
        a = await ask(server, SVC)
        assert rcode(a) == "NOERROR" and values(a) == ["10.96.0.20"]
        assert a.answer[0].ttl == 7 and a.flags & dns.flags.AA
        srv = await ask(server, "_http._tcp." + SVC, "SRV")
        assert values(srv) == ["0 100 80 web.default.svc.cluster.local."]
        assert [r.to_text() for rr in srv.additional for r in rr] == ["10.96.0.20"]
        assert values(await ask(server, "_dns._udp." + SVC, "SRV")) == [
            "0 100 53 web.default.svc.cluster.local."
        ]
        # no SRV for a port without a name; nor for a protocol the port does not have
        for name in ("_http._udp." + SVC, "_8080._tcp.plain.default.svc.cluster.local."):
            assert rcode(await ask(server, name, "SRV")) == "NXDOMAIN"
        ptr = await ask(server, "20.0.96.10.in-addr.arpa.", "PTR")
        assert values(ptr) == [SVC]
        # case-insensitive, and the answer echoes the question's case
        mixed = await ask(server, "WeB.DeFault.SVC.Cluster.Local.")
        assert values(mixed) == ["10.96.0.20"]
        assert mixed.answer[0].name.to_text() == "WeB.DeFault.SVC.Cluster.Local."
        assert mixed.question[0].name.to_text() == "WeB.DeFault.SVC.Cluster.Local."


async def test_apex_version_and_ns(store: Store) -> None:
    await store.create(NetworkConfig(metadata={"name": "cluster"}))
    async with dns_server(store) as server:
        soa = await ask(server, "cluster.local.", "SOA")
        [text] = values(soa)
        assert text.startswith("ns.dns.cluster.local. hostmaster.cluster.local. ")
        assert values(await ask(server, "cluster.local.", "NS")) == ["ns.dns.cluster.local."]
        assert values(await ask(server, "ns.dns.cluster.local.")) == ["10.96.0.10"]
        assert values(await ask(server, "dns-version.cluster.local.", "TXT")) == ['"1.1.0"']


async def test_zone_from_network_config(store: Store) -> None:
    await store.create(
        NetworkConfig.model_validate(
            {"metadata": {"name": "cluster"}, "spec": {"clusterDomain": "corp.internal"}}
        )
    )
    await store.create(service("web", ip="10.96.0.20"))
    async with dns_server(store) as server:
        assert values(await ask(server, "web.default.svc.corp.internal.")) == ["10.96.0.20"]
        assert server.index is not None and server.index.zone == "corp.internal"


async def test_negative_answers_carry_the_soa(store: Store) -> None:
    await store.create(service("web", ip="10.96.0.20"))
    async with dns_server(store, ttl=9) as server:
        cases = {
            ("nothere.default.svc.cluster.local.", "A"): "NXDOMAIN",
            ("web.nons.svc.cluster.local.", "A"): "NXDOMAIN",
            ("a.web.default.svc.cluster.local.", "A"): "NXDOMAIN",
            (SVC, "AAAA"): "NOERROR",  # NODATA: the name exists, the type does not
            (SVC, "TXT"): "NOERROR",
            ("default.svc.cluster.local.", "A"): "NOERROR",  # an empty non-terminal
            ("svc.cluster.local.", "A"): "NOERROR",
            ("dns-version.cluster.local.", "A"): "NOERROR",
        }
        for (name, t), want in cases.items():
            for edns in (None, 0):
                m = await ask(server, name, t, edns=edns)
                assert rcode(m) == want, (name, t, edns)
                assert not m.answer, (name, t)
                assert soa_ttl(m) == 9, (name, t)  # negative TTL: the SOA's
                assert m.flags & dns.flags.AA
                assert (m.edns >= 0) == (edns is not None)


async def test_headless_service_records(store: Store) -> None:
    await store.create(service("db", headless=True, ports=[{"name": "pg", "port": 5432}]))
    await store.create(
        endpoint_slice(
            "db",
            [("10.244.1.5", True, "db-0"), ("10.244.2.6", True, None), ("10.244.3.7", False, "x")],
            ports=[("pg", 5432, "TCP")],
        )
    )
    await store.create(service("solo", headless=True, ports=[{"port": 9}]))  # unnamed port
    await store.create(
        endpoint_slice("solo", [("10.244.4.4", True, None)], ports=[(None, 9, "TCP")])
    )
    base = "db.default.svc.cluster.local."
    async with dns_server(store) as server:
        assert values(await ask(server, base)) == ["10.244.1.5", "10.244.2.6"]  # ready only
        assert values(await ask(server, "db-0." + base)) == ["10.244.1.5"]
        assert values(await ask(server, "10-244-2-6." + base)) == ["10.244.2.6"]
        assert rcode(await ask(server, "x." + base)) == "NXDOMAIN"  # not ready
        srv = await ask(server, "_pg._tcp." + base, "SRV")
        assert values(srv) == [f"0 50 5432 10-244-2-6.{base}", f"0 50 5432 db-0.{base}"]
        extra = sorted(r.to_text() for rr in srv.additional for r in rr)
        assert extra == ["10.244.1.5", "10.244.2.6"]
        assert values(await ask(server, "5.1.244.10.in-addr.arpa.", "PTR")) == ["db-0." + base]
        assert values(await ask(server, "6.2.244.10.in-addr.arpa.", "PTR")) == [
            "10-244-2-6." + base
        ]
        solo = "solo.default.svc.cluster.local."
        assert values(await ask(server, solo)) == ["10.244.4.4"]
        for name in (solo, "_9._tcp." + solo, "_._tcp." + solo):
            m = await ask(server, name, "SRV")
            assert not m.answer, name


async def test_headless_without_ready_endpoints_is_nxdomain(store: Store) -> None:
    await store.create(service("empty", headless=True, ports=[{"name": "p", "port": 1}]))
    await store.create(
        endpoint_slice("empty", [("10.244.1.9", False, "e-0")], ports=[("p", 1, "TCP")])
    )
    await store.create(service("none", headless=True))
    async with dns_server(store) as server:
        for name in ("empty", "none"):
            m = await ask(server, f"{name}.default.svc.cluster.local.")
            assert rcode(m) == "NXDOMAIN" and soa_ttl(m) is not None
        m = await ask(server, "_p._tcp.empty.default.svc.cluster.local.", "SRV")
        assert rcode(m) == "NXDOMAIN"


async def test_publish_not_ready_addresses(store: Store) -> None:
    await store.create(service("peers", headless=True, publish=True))
    await store.create(endpoint_slice("peers", [("10.244.1.9", False, "p-0")]))
    async with dns_server(store) as server:
        assert values(await ask(server, "peers.default.svc.cluster.local.")) == ["10.244.1.9"]
        assert values(await ask(server, "p-0.peers.default.svc.cluster.local.")) == ["10.244.1.9"]


async def test_one_ptr_per_ip_and_headless_wins(store: Store) -> None:
    ip = "10.244.1.5"
    await store.create(service("web", ip="10.96.0.20"))
    await store.create(endpoint_slice("web", [(ip, True, None)], ports=[(None, 80, "TCP")]))
    await store.create(service("zz", headless=True))
    await store.create(endpoint_slice("zz", [(ip, True, "zz-0")]))
    await store.create(service("aa", headless=True))
    await store.create(endpoint_slice("aa", [(ip, True, "aa-0")]))
    async with dns_server(store) as server:
        m = await ask(server, "5.1.244.10.in-addr.arpa.", "PTR")
        assert values(m) == ["aa-0.aa.default.svc.cluster.local."]  # one, the smallest
        await store.delete(Service, "aa", "default")
        await caught_up(server, store)
        m = await ask(server, "5.1.244.10.in-addr.arpa.", "PTR")
        assert values(m) == ["zz-0.zz.default.svc.cluster.local."]


async def test_pod_records_by_mode(store: Store) -> None:
    await store.create(pod("p1", "10.244.1.5", ns="team"))
    name = "10-244-1-5.team.pod.cluster.local."
    async with dns_server(store, pods="insecure") as server:
        assert values(await ask(server, name)) == ["10.244.1.5"]
        assert values(await ask(server, "10-244-9-9.other.pod.cluster.local.")) == ["10.244.9.9"]
        assert rcode(await ask(server, "not-an-ip.team.pod.cluster.local.")) == "NXDOMAIN"
        m = await ask(server, name, "AAAA")
        assert rcode(m) == "NOERROR" and not m.answer and soa_ttl(m) is not None
    async with dns_server(store, pods="disabled") as server:
        assert rcode(await ask(server, name)) == "NXDOMAIN"
    async with dns_server(store, pods="verified") as server:
        assert values(await ask(server, name)) == ["10.244.1.5"]
        assert rcode(await ask(server, "10-244-1-5.other.pod.cluster.local.")) == "NXDOMAIN"
        assert rcode(await ask(server, "10-244-1-6.team.pod.cluster.local.")) == "NXDOMAIN"


async def test_servfail_before_the_first_sync(store: Store) -> None:
    await store.create(service("web", ip="10.96.0.20"))
    async with dns_server(store, sync=False) as server:
        await caught_up(server, store)  # the index has the Service; the sync is not done
        assert server.index is not None and server.index.fast
        m = await ask(server, SVC)
        assert rcode(m) == "SERVFAIL" and not server.ready()
        assert rcode(await ask(server, SVC, edns=0)) == "SERVFAIL"
        assert rcode(await ask(server, "nothere.default.svc.cluster.local.")) == "SERVFAIL"
        assert rcode(await ask(server, SVC, tcp=True)) == "SERVFAIL"


async def test_a_record_follows_each_watch_event(store: Store) -> None:
    await store.create(service("web", ip="10.96.0.20"))
    async with dns_server(store) as server:
        assert values(await ask(server, SVC)) == ["10.96.0.20"]
        for i in range(3):  # deleted, then recreated with another VIP: never the old one
            await store.delete(Service, "web", "default")
            await caught_up(server, store)
            assert rcode(await ask(server, SVC)) == "NXDOMAIN"
            ip = f"10.96.1.{i}"
            await store.create(service("web", ip=ip))
            await caught_up(server, store)
            assert values(await ask(server, SVC)) == [ip]
            assert values(await ask(server, SVC, tcp=True)) == [ip]
        # a headless endpoint goes away in one slice update
        await store.create(service("db", headless=True))
        s = await store.create(endpoint_slice("db", [("10.244.1.1", True, "a")]))
        await caught_up(server, store, EndpointSlice)
        assert values(await ask(server, "a.db.default.svc.cluster.local.")) == ["10.244.1.1"]
        await store.update(
            endpoint_slice("db", [("10.244.1.1", False, "a")]).model_copy(
                update={"metadata": s.metadata}
            )
        )
        await caught_up(server, store, EndpointSlice)
        assert rcode(await ask(server, "a.db.default.svc.cluster.local.")) == "NXDOMAIN"
        assert not (await ask(server, "1.1.244.10.in-addr.arpa.", "PTR")).answer
        await store.create(endpoint_slice("db", [("10.244.1.2", True, "a")], name="db-2"))
        await caught_up(server, store, EndpointSlice)
        assert values(await ask(server, "a.db.default.svc.cluster.local.")) == ["10.244.1.2"]


async def test_truncation_over_udp_then_tcp(store: Store) -> None:
    eps = [(f"10.244.{i // 200}.{i % 200 + 1}", True, None) for i in range(60)]
    await store.create(service("big", headless=True))
    await store.create(endpoint_slice("big", eps))
    name = "big.default.svc.cluster.local."
    async with dns_server(store) as server:
        udp = await ask(server, name)
        assert udp.flags & dns.flags.TC and not udp.answer  # 60 A records > 512 bytes
        tcp = await ask(server, name, tcp=True)
        assert not tcp.flags & dns.flags.TC and len(values(tcp)) == 60
        big = await ask(server, name, edns=0, payload=4096)  # EDNS0: it fits
        assert not big.flags & dns.flags.TC and len(values(big)) == 60
        small = await ask(server, name, edns=0, payload=600)
        assert small.flags & dns.flags.TC


async def test_any_query_and_edns_version(store: Store) -> None:
    await store.create(service("web", ip="10.96.0.20", ports=[{"name": "h", "port": 80}]))
    async with dns_server(store) as server:
        m = await ask(server, SVC, "ANY")
        assert [rr.rdtype for rr in m.answer] == [dns.rdatatype.A]
        q = dns.message.make_query(SVC, "A", use_edns=1)
        r = await dns.asyncquery.udp(q, "127.0.0.1", port=server.addresses[0][1], timeout=5)
        assert r.rcode() == 16  # BADVERS


async def test_user_written_endpoints_of_a_selectorless_service(store: Store) -> None:
    await store.create(service("legacy", headless=True, ports=[{"name": "db", "port": 3306}]))
    await store.create(
        Endpoints.model_validate(
            {
                "metadata": {"name": "legacy", "namespace": "default"},
                "subsets": [
                    {
                        "addresses": [{"ip": "192.168.7.1", "hostname": "primary"}],
                        "notReadyAddresses": [{"ip": "192.168.7.2", "hostname": "replica"}],
                        "ports": [{"name": "db", "port": 3306}],
                    }
                ],
            }
        )
    )
    base = "legacy.default.svc.cluster.local."
    async with dns_server(store) as server:
        assert values(await ask(server, base)) == ["192.168.7.1"]
        assert values(await ask(server, "primary." + base)) == ["192.168.7.1"]
        assert rcode(await ask(server, "replica." + base)) == "NXDOMAIN"
        srv = await ask(server, "_db._tcp." + base, "SRV")
        assert values(srv) == [f"0 100 3306 primary.{base}"]
        # a slice, once there is one, is what counts (as after mirroring)
        await store.create(endpoint_slice("legacy", [("192.168.7.3", True, "other")]))
        await caught_up(server, store, EndpointSlice)
        assert values(await ask(server, base)) == ["192.168.7.3"]


async def test_what_the_endpoints_controller_writes(store: Store) -> None:
    """Pods with hostname + subdomain behind a headless Service, through the real
    endpoints controller: the names a StatefulSet's pods get."""
    for i, ready in ((0, True), (1, True), (2, False)):
        p = pod(f"web-{i}", f"10.244.1.{10 + i}")
        p.metadata.labels = {"app": "web"}
        p.spec.hostname, p.spec.subdomain = f"web-{i}", "nginx"
        p.status.conditions = [PodCondition(type="Ready", status="True" if ready else "False")]
        await store.create(p)
    headless = service("nginx", headless=True, ports=[{"name": "http", "port": 80}])
    headless.spec.selector = {"app": "web"}
    await store.create(headless)
    ctl = EndpointsController(store)
    task = asyncio.create_task(ctl.run())
    base = "nginx.default.svc.cluster.local."
    try:
        async with dns_server(store) as server:
            await wait_for_answer(server, base, 2)
            assert values(await ask(server, base)) == ["10.244.1.10", "10.244.1.11"]
            assert values(await ask(server, "web-1." + base)) == ["10.244.1.11"]
            assert rcode(await ask(server, "web-2." + base)) == "NXDOMAIN"  # not ready
            assert values(await ask(server, "_http._tcp." + base, "SRV")) == [
                f"0 50 80 web-0.{base}",
                f"0 50 80 web-1.{base}",
            ]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for_answer(server: DNSServer, name: str, n: int) -> None:
    for _ in range(500):
        if len(values(await ask(server, name))) == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never had {n} answers")
