"""The zone index on its own: what a Service puts in, and that removing it leaves
nothing behind (no name, empty non-terminal, fast-path entry or PTR candidate)."""

from __future__ import annotations

from corral.clusterdns import wire
from corral.clusterdns.records import ZoneIndex
from corral.clusterdns.views import ServiceInfo, SliceInfo
from tests.dns_helpers import endpoint_slice, service


def snapshot(ix: ZoneIndex) -> tuple:
    return (
        dict(ix.names),
        dict(ix.ents),
        dict(ix.fast),
        dict(ix._ptr_candidates),
        dict(ix._ptr_chosen),
        dict(ix._owned),
    )


def test_adding_then_removing_services_leaves_the_apex_alone() -> None:
    ix = ZoneIndex("cluster.local", 5, dns_ip="10.96.0.10")
    empty = snapshot(ix)
    for i in range(50):
        ns = f"ns{i % 3}"
        if i % 2:
            svc = service(f"s{i}", ns, ip=f"10.96.1.{i}", ports=[{"name": "p", "port": 80}])
            ix.set_service(f"{ns}/s{i}", ServiceInfo.of(svc), [])
        else:
            svc = service(f"s{i}", ns, headless=True, ports=[{"name": "p", "port": 80}])
            sl = endpoint_slice(
                f"s{i}",
                [(f"10.244.0.{i}", True, f"h{i}"), ("10.244.9.9", True, None)],
                ns,
                ports=[("p", 80, "TCP")],
            )
            ix.set_service(f"{ns}/s{i}", ServiceInfo.of(svc), [SliceInfo.of(sl)])
    assert ix.services == 50
    assert wire.encode_name("ns1.svc.cluster.local") in ix.ents
    shared = ix.lookup(wire.encode_name("9.9.244.10.in-addr.arpa"))
    assert shared is not None  # 10.244.9.9 is behind 25 headless Services: one PTR
    for i in range(50):
        ix.set_service(f"ns{i % 3}/s{i}", None, [])
    assert snapshot(ix) == empty


def test_a_changed_endpoint_changes_the_srv_additional_records() -> None:
    ix = ZoneIndex("cluster.local", 5)
    svc = ServiceInfo.of(service("db", headless=True, ports=[{"name": "p", "port": 1}]))
    for ip in ("10.244.0.1", "10.244.0.2"):
        sl = endpoint_slice("db", [(ip, True, "db-0")], ports=[("p", 1, "TCP")])
        ix.set_service("default/db", svc, [SliceInfo.of(sl)])
        [entry] = ix.lookup(wire.encode_name("_p._tcp.db.default.svc.cluster.local")).values()
        assert entry[4].endswith(bytes(int(x) for x in ip.split(".")))  # the target's A
