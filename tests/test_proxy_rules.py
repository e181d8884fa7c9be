"""The service proxy's pure parts: views from objects, the rule builder, the mode's bookkeeping."""

from __future__ import annotations

from typing import Any

import pytest

from corral.api.objects import EndpointSlice, Service
from corral.proxy import rules as R
from corral.proxy.core import (
    EndpointInfo,
    ServicePort,
    ServiceView,
    service_ports,
    slice_endpoints,
    usable,
)
from corral.proxy.iptables import IptablesMode

CIDR = "10.244.0.0/16"


def svc(**spec: object) -> Service:
    base: dict = {"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]}
    base.update(spec)
    return Service(metadata={"name": "web", "namespace": "default"}, spec=base)


def eps(n: int, port: int = 8080, **cond: bool) -> tuple[EndpointInfo, ...]:
    return tuple(EndpointInfo(f"10.244.1.{i + 2}", port, **cond) for i in range(n))


def view(sp: ServicePort, endpoints: tuple[EndpointInfo, ...]) -> ServiceView:
    return ServiceView((sp,), ((sp.key, endpoints),) if endpoints else ())


SP = ServicePort("default/web", "", "TCP", "10.96.0.20", 80)


def test_service_ports_skip_headless_externalname_and_unallocated() -> None:
    assert service_ports(svc(clusterIP="None", ports=[])) == ()
    assert service_ports(svc(clusterIP=None)) == ()
    ext = Service(
        metadata={"name": "x", "namespace": "default"},
        spec={"type": "ExternalName", "externalName": "example.com"},
    )
    assert service_ports(ext) == ()
    (p,) = service_ports(svc(sessionAffinity="ClientIP"))
    assert p.affinity_timeout == 10800 and p.node_port is None
    (p,) = service_ports(
        svc(
            type="NodePort",
            ports=[{"port": 80, "nodePort": 30080}],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}},
        )
    )
    assert (p.node_port, p.affinity_timeout) == (30080, 5)


def test_slices_merge_by_port_name_with_conditions() -> None:
    def sl(name: str, ip: str, port: int, **cond: bool) -> EndpointSlice:
        return EndpointSlice(
            metadata={"name": name, "namespace": "default"},
            endpoints=[{"addresses": [ip], "conditions": cond}],
            ports=[{"name": "http", "port": port}],
        )

    got = slice_endpoints(
        [
            sl("a", "10.244.1.2", 8080, ready=True, serving=True),
            sl("b", "10.244.2.2", 9090, ready=False, serving=True, terminating=True),
            sl("c", "10.244.1.2", 8080, ready=False),  # listed twice: ready wins
        ]
    )
    assert got == {
        ("http", "TCP"): (
            EndpointInfo("10.244.1.2", 8080, True, True, False),
            EndpointInfo("10.244.2.2", 9090, False, True, True),
        )
    }


def test_usable_prefers_ready_then_serving_terminating() -> None:
    ready = EndpointInfo("10.244.1.2", 80)
    term = EndpointInfo("10.244.1.3", 80, ready=False, serving=True, terminating=True)
    notready = EndpointInfo("10.244.1.4", 80, ready=False, serving=False)
    assert usable((ready, term, notready)) == (ready,)
    assert usable((term, notready)) == (term,)
    assert usable((notready,)) == ()


def test_random_cascade_probabilities() -> None:
    r = R.service_rules(view(SP, eps(3)), CIDR)
    svc_rules = r.chains[R.svc_chain(SP)]
    assert svc_rules[0].startswith(f"-A {R.svc_chain(SP)} ! -s {CIDR} -d 10.96.0.20/32")
    probs = [ln.split("--probability ")[1].split()[0] for ln in svc_rules if "statistic" in ln]
    assert [float(p) for p in probs] == pytest.approx([1 / 3, 1 / 2], abs=1e-9)
    assert "statistic" not in svc_rules[-1]  # the last endpoint takes what is left
    assert len(r.chains) == 4 and len(r.portals) == 1 and not r.rejects
    sep = r.chains[R.sep_chain(SP, eps(3)[0])]
    assert sep[0] == f"-A {R.sep_chain(SP, eps(3)[0])} -s 10.244.1.2/32 -j {R.MARK_MASQ}"
    assert sep[-1].endswith("-p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080")


def test_no_endpoints_rejects_vip_and_nodeport() -> None:
    sp = ServicePort("default/web", "", "UDP", "10.96.0.20", 53, node_port=30053)
    r = R.service_rules(view(sp, ()), CIDR)
    assert not r.chains and not r.portals
    assert len(r.rejects) == 2
    assert all("-j REJECT --reject-with icmp-port-unreachable" in ln for ln in r.rejects)
    tcp = ServicePort("default/web", "", "TCP", "10.96.0.20", 80)
    (line,) = R.service_rules(view(tcp, ()), CIDR).rejects
    assert line.endswith("-j REJECT --reject-with tcp-reset")
    assert "-m addrtype --dst-type LOCAL -p udp -m udp --dport 30053" in r.rejects[1]


def test_affinity_uses_one_set_per_endpoint() -> None:
    sp = ServicePort("default/web", "", "TCP", "10.96.0.20", 80, affinity_timeout=7)
    e = eps(2)
    r = R.service_rules(view(sp, e), CIDR)
    sets = [R.affinity_set(sp, x) for x in e]
    assert r.sets == dict.fromkeys(sets, 7)
    lines = r.chains[R.svc_chain(sp)]
    sticks = [ln for ln in lines if "--match-set" in ln]
    assert sticks == [
        f"-A {R.svc_chain(sp)} -m set --match-set {s} src -j {R.sep_chain(sp, x)}"
        for s, x in zip(sets, e, strict=True)
    ]
    assert lines.index(sticks[-1]) < next(i for i, ln in enumerate(lines) if "statistic" in ln)
    sep = r.chains[R.sep_chain(sp, e[0])]
    assert f"-j SET --add-set {sets[0]} src --exist --timeout 7" in " ".join(sep)
    assert all(len(n) <= 28 for n in [*r.chains, *sets])  # iptables/ipset name limits


def test_names_are_deterministic_and_distinct() -> None:
    other = ServicePort("default/web", "", "UDP", "10.96.0.20", 80)
    assert R.svc_chain(SP) == R.svc_chain(ServicePort("default/web", "", "TCP", "10.96.0.9", 80))
    assert R.svc_chain(SP) != R.svc_chain(other)
    assert R.sep_chain(SP, eps(1)[0]) != R.sep_chain(other, eps(1)[0])


def test_multiport_named_target_ports() -> None:
    s = svc(
        ports=[
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "metrics", "port": 9100, "targetPort": 9100},
        ]
    )
    ports = service_ports(s)
    v = ServiceView(
        ports,
        (
            (("http", "TCP"), eps(2, 8080)),
            (("metrics", "TCP"), eps(1, 9100)),
        ),
    )
    r = R.service_rules(v, CIDR)
    assert len(r.portals) == 2
    dnat = sorted(
        ln.split("--to-destination ")[1] for c in r.chains.values() for ln in c if "DNAT" in ln
    )
    assert dnat == ["10.244.1.2:8080", "10.244.1.2:9100", "10.244.1.3:8080"]


class FakeNetfilter:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.texts: list[str] = []
        self.ipsets: list[str] = []

    def restore(self, text: str) -> None:
        self.calls.append("iptables-restore")
        self.texts.append(text)

    def ipset(self, text: str) -> None:
        self.calls.append("ipset")
        self.ipsets.append(text)

    def ipset_names(self) -> set[str]:
        return set()

    def chains(self, table: str) -> set[str]:
        return {"CORRAL-SVC-STALEONE00000000"} if table == "nat" else set()

    def has_rule(self, table: str, chain: str, rule: list[str]) -> bool:
        return False

    def conntrack_delete(self, args: list[str]) -> None:
        self.calls.append("conntrack " + " ".join(args))


def test_partial_sync_writes_only_changed_services_and_one_restore() -> None:
    k = FakeNetfilter()
    m = IptablesMode(CIDR, k)  # type: ignore[arg-type]
    a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80)
    b = ServicePort("default/b", "", "UDP", "10.96.0.2", 53)
    views = {"default/a": view(a, eps(3)), "default/b": view(b, eps(2, 53))}
    first = m.sync(False, views, set())  # nothing known yet: a full sync
    assert first.full and k.calls.count("iptables-restore") == 1
    text = k.texts[-1]
    assert "-X CORRAL-SVC-STALEONE00000000" in text  # a chain nobody wants any more
    assert text.count("-I PREROUTING 1") == 1 and text.count("-I FORWARD 1") == 1
    # b loses an endpoint: only b's chains are written (its portal line is the same)
    k.calls.clear()
    views["default/b"] = view(b, eps(1, 53))
    second = m.sync(False, views, {"default/b"})
    assert not second.full and k.calls[0] == "iptables-restore"
    text = k.texts[-1]
    assert R.svc_chain(a) not in declared(text) and R.SERVICES not in declared(text)
    assert f":{R.svc_chain(b)} - [0:0]" in text
    gone = R.sep_chain(b, eps(2, 53)[1])
    assert f"-X {gone}" in text
    assert "-I PREROUTING" not in text  # hooks are checked by full syncs only
    # UDP flows to the endpoint that went away are deleted
    assert k.calls[1:] == ["conntrack -p udp --orig-dst 10.96.0.2 --dst-nat 10.244.1.3"]


def test_udp_service_from_zero_to_some_endpoints_clears_vip_flows() -> None:
    k = FakeNetfilter()
    m = IptablesMode(CIDR, k)  # type: ignore[arg-type]
    b = ServicePort("default/b", "", "UDP", "10.96.0.2", 53)
    m.sync(True, {"default/b": view(b, ())}, set())
    k.calls.clear()
    m.sync(False, {"default/b": view(b, eps(1, 53))}, {"default/b"})
    assert "conntrack -p udp --orig-dst 10.96.0.2 --orig-port-dst 53" in k.calls


def test_affinity_sets_created_before_and_destroyed_after_the_restore() -> None:
    k = FakeNetfilter()
    m = IptablesMode(CIDR, k)  # type: ignore[arg-type]
    a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80, affinity_timeout=10)
    m.sync(True, {"default/a": view(a, eps(2))}, set())
    assert k.calls == ["ipset", "iptables-restore"]
    assert k.ipsets[0].count("create CORRAL-AFF-") == 2 and "timeout 10 -exist" in k.ipsets[0]
    k.calls.clear()
    # affinity off: the sets go, after the rules that used them
    plain = ServicePort("default/a", "", "TCP", "10.96.0.1", 80)
    m.sync(False, {"default/a": view(plain, eps(2))}, {"default/a"})
    assert k.calls == ["iptables-restore", "ipset"]
    assert k.ipsets[-1].count("destroy CORRAL-AFF-") == 2


def test_deleted_service_leaves_no_chains() -> None:
    k = FakeNetfilter()
    m = IptablesMode(CIDR, k)  # type: ignore[arg-type]
    m.sync(True, {"default/web": view(SP, eps(2))}, set())
    assert m.chains and len(m.chains) == 4  # SVC, 2 SEP, the VIP's bucket
    m.sync(False, {}, {"default/web"})
    assert m.chains == set()
    text = k.texts[-1]
    assert text.count("-X CORRAL-S") == 3 and f"-X {R.bucket_chain(20)}" in text
    # the top chain no longer jumps to the emptied bucket
    top = [ln for ln in text.splitlines() if ln.startswith(f"-A {R.SERVICES} ")]
    assert top and not any("CORRAL-BUCKET" in ln for ln in top)


def declared(text: str) -> set[str]:
    return {ln[1:].split()[0] for ln in text.splitlines() if ln[:1] == ":"}


def test_two_level_dispatch_by_vip_bucket() -> None:
    k = FakeNetfilter()
    m = IptablesMode(CIDR, k)  # type: ignore[arg-type]
    views = {}
    for i in range(600):  # sequential VIPs spread over all 256 buckets
        sp = ServicePort(f"default/s{i}", "", "TCP", f"10.96.{i // 256}.{i % 256}", 80)
        views[sp.service] = view(sp, eps(1))
    m.sync(True, views, set())
    text = k.texts[-1]
    top = [ln for ln in text.splitlines() if ln.startswith(f"-A {R.SERVICES} ")]
    assert len(top) == 257  # a jump per bucket, then nodePorts
    assert top[7] == f"-A {R.SERVICES} -d 0.0.0.7/0.0.0.255 -j {R.bucket_chain(7)}"
    b7 = [ln for ln in text.splitlines() if ln.startswith(f"-A {R.bucket_chain(7)} ")]
    assert sorted(ln.split()[3] for ln in b7) == ["10.96.0.7/32", "10.96.1.7/32", "10.96.2.7/32"]
    # an endpoint change rewrites that service's chains only: no dispatch chain
    sp = views["default/s7"].ports[0]
    views["default/s7"] = view(sp, eps(2))
    m.sync(False, views, {"default/s7"})
    assert declared(k.texts[-1]) == {R.svc_chain(sp)} | {R.sep_chain(sp, e) for e in eps(2)}
    assert "*filter" not in k.texts[-1]
    # a new service in a used bucket: its chains and its bucket, not the top chain
    new = ServicePort("default/new", "", "TCP", "10.96.9.7", 80)
    views["default/new"] = view(new, eps(1))
    m.sync(False, views, {"default/new"})
    d = declared(k.texts[-1])
    assert R.bucket_chain(7) in d and R.SERVICES not in d and len(d) == 3
    assert k.texts[-1].count(f"-A {R.bucket_chain(7)} ") == 4
    # losing its endpoints: the bucket changes and a REJECT appears (filter only)
    views["default/new"] = view(new, ())
    m.sync(False, views, {"default/new"})
    assert "*filter" in k.texts[-1] and "default/new has no endpoints" in k.texts[-1]
    assert f"-X {R.svc_chain(new)}" in k.texts[-1]
    # nothing changed: no restore at all
    n = len(k.texts)
    m.sync(False, views, {"default/new"})
    assert len(k.texts) == n


def test_fast_path_endpoint_deltas_count_shared_endpoints() -> None:
    from corral.proxy.fastpath_endpoints import FastPathEndpoints

    fp = FastPathEndpoints("n1", lambda: set())
    a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80)
    b = ServicePort("default/b", "", "TCP", "10.96.0.2", 80)
    views = {"default/a": view(a, eps(2)), "default/b": view(b, eps(1))}  # share 10.244.1.2
    added, gone = fp.delta(views, set(), True)
    assert added == {("10.244.1.2", 8080, "TCP"), ("10.244.1.3", 8080, "TCP")} and not gone
    # a loses both: only the endpoint no other service uses goes
    views["default/a"] = view(a, ())
    added, gone = fp.delta(views, {"default/a"}, False)
    assert not added and gone == {("10.244.1.3", 8080, "TCP")}
    del views["default/b"]
    added, gone = fp.delta(views, {"default/b"}, False)
    assert gone == {("10.244.1.2", 8080, "TCP")} and not fp._ep_count


def test_iptables_mode_feeds_the_fast_path_around_its_restore() -> None:
    """New endpoints enter the map before the restore; a gone one leaves after it, and
    only once conntrack holds no flow of it (it drains)."""
    from corral.proxy.fastpath_endpoints import FastPathEndpoints

    k = FakeNetfilter()
    live: set[tuple[str, int, str]] = set()
    fp = FastPathEndpoints("n1", lambda: live)
    events: list[str] = []

    class FakeMap:
        id, path = 7, "/sys/fs/bpf/corral/n1/proxy_endpoints"
        have: set[tuple[str, int, str]] = set()

        def entries(self) -> set[tuple[str, int, str]]:
            return set(self.have)

        def update(self, add: Any, gone: Any) -> None:
            events.append(f"map +{len(add)} -{len(gone)} after {len(k.texts)} restore(s)")
            self.have = (self.have | set(add)) - set(gone)

        def close(self) -> None:
            pass

    fp._map = m = FakeMap()
    mode = IptablesMode(CIDR, k, fp)  # type: ignore[arg-type]
    a = ServicePort("default/a", "", "TCP", "10.96.0.1", 80)
    mode.sync(True, {"default/a": view(a, eps(2))}, set())
    assert events[0] == "map +2 -0 after 0 restore(s)" and len(m.have) == 2
    live.add(("10.244.1.3", 8080, "TCP"))  # a connection to the endpoint about to go
    mode.sync(False, {"default/a": view(a, eps(1))}, {"default/a"})
    assert len(m.have) == 2 and fp.draining and mode.wants_sync()
    live.clear()
    mode.sync(False, {"default/a": view(a, eps(1))}, set())
    assert m.have == {("10.244.1.2", 8080, "TCP")} and not mode.wants_sync()


def test_restarted_proxy_keeps_udp_flows_of_services_it_finds_programmed() -> None:
    b = ServicePort("default/b", "", "UDP", "10.96.0.2", 53)
    k = FakeNetfilter()
    k.chains = lambda table: {R.svc_chain(b)} if table == "nat" else set()  # type: ignore[method-assign]
    m = IptablesMode(CIDR, k)  # type: ignore[arg-type]
    m.sync(True, {"default/b": view(b, eps(1, 53))}, set())
    assert not [c for c in k.calls if c.startswith("conntrack")]


def test_conntrack_dnat_replies_parse_the_reply_tuple() -> None:
    from corral.proxy.iptables import parse_dnat_replies

    text = (
        "tcp      6 431999 ESTABLISHED src=10.244.1.5 dst=10.96.0.10 sport=34567 dport=80 "
        "src=10.244.2.3 dst=10.244.1.5 sport=8080 dport=34567 [ASSURED] mark=0 use=1\n"
        "udp      17 29 src=10.244.1.5 dst=10.96.0.53 sport=5000 dport=53 [UNREPLIED] "
        "src=10.244.3.4 dst=10.244.1.5 sport=5353 dport=5000 mark=0 use=1\n"
    )
    assert parse_dnat_replies(text) == {("10.244.2.3", 8080, "TCP"), ("10.244.3.4", 5353, "UDP")}


# ------------------------------------------------------------ traffic policies, external IPs


def _mixed() -> tuple[EndpointInfo, ...]:
    """Two endpoints elsewhere, one on the proxy's node."""
    return (
        EndpointInfo("10.244.1.2", 8080),
        EndpointInfo("10.244.2.2", 8080),
        EndpointInfo("10.244.3.2", 8080, local=True),
    )


def _lines(r: R.ServiceRules) -> list[str]:
    return [ln for c in r.chains.values() for ln in c] + r.portals + r.nodeports + r.externals


def _dnat(r: R.ServiceRules, chain: str) -> set[str]:
    """The endpoints `chain` balances over."""
    seps = [ln.split()[-1] for ln in r.chains.get(chain, []) if "-j CORRAL-SEP-" in ln]
    return {r.chains[s][-1].split()[-1].split(":")[0] for s in seps}


def test_service_ports_carry_policies_external_ips_and_lb_ingress() -> None:
    s = svc(type="LoadBalancer", externalTrafficPolicy="Local", internalTrafficPolicy="Local",
            healthCheckNodePort=31999, externalIPs=["10.235.0.77"],
            ports=[{"port": 80, "nodePort": 30080}])  # fmt: skip
    s.status.load_balancer.ingress = [{"ip": "10.235.0.200"}]
    (p,) = service_ports(s)
    assert (p.internal_local, p.external_local, p.health_check_node_port) == (True, True, 31999)
    assert p.external_ips == ("10.235.0.77", "10.235.0.200") and p.external


def test_slice_endpoints_mark_the_nodes_own() -> None:
    sl = EndpointSlice(
        metadata={"name": "web-1", "namespace": "default",
                  "labels": {"kubernetes.io/service-name": "web"}},
        endpoints=[{"addresses": ["10.244.1.2"], "nodeName": "n1"},
                   {"addresses": ["10.244.2.2"], "nodeName": "n2"}],
        ports=[{"port": 8080}],
    )  # fmt: skip
    got = slice_endpoints([sl], "n2")[("", "TCP")]
    assert [(e.ip, e.local) for e in got] == [("10.244.1.2", False), ("10.244.2.2", True)]
    assert not any(e.local for e in slice_endpoints([sl])[("", "TCP")])


def test_internal_local_uses_the_nodes_endpoints_and_drops_without() -> None:
    sp = ServicePort("default/web", "", "TCP", "10.96.0.20", 80, internal_local=True)
    r = R.service_rules(view(sp, _mixed()), CIDR)
    assert r.portals[0].endswith(f"-j {R.svl_chain(sp)}")
    assert _dnat(r, R.svl_chain(sp)) == {"10.244.3.2"}
    assert R.svc_chain(sp) not in r.chains and not r.rejects
    # none on this node: dropped (the service has endpoints elsewhere), not rejected
    r = R.service_rules(view(sp, _mixed()[:2]), CIDR)
    assert not r.portals and len(r.rejects) == 1 and r.rejects[0].endswith("-j DROP")
    # none anywhere: rejected
    r = R.service_rules(view(sp, ()), CIDR)
    assert "REJECT --reject-with tcp-reset" in r.rejects[0]


def test_external_local_keeps_the_client_and_uses_local_endpoints() -> None:
    sp = ServicePort("default/web", "", "TCP", "10.96.0.20", 80, node_port=30080,
                     external_ips=("10.235.0.77",), external_local=True)  # fmt: skip
    r = R.service_rules(view(sp, _mixed()), CIDR)
    ext, svc_, svl = R.ext_chain(sp), R.svc_chain(sp), R.svl_chain(sp)
    assert r.nodeports == [
        f'-A {R.NODEPORTS} -p tcp -m tcp --dport 30080 -m comment --comment "default/web" -j {ext}'
    ]
    assert len(r.externals) == 1 and "-d 10.235.0.77/32" in r.externals[0]
    rules = r.chains[ext]
    # pods and the node's own processes go cluster-wide; outside clients to local ones,
    # with no masquerade mark on their way
    assert rules[0].startswith(f"-A {ext} -s {CIDR}") and rules[0].endswith(svc_)
    assert rules[-1] == f"-A {ext} -j {svl}"
    assert not any(R.MARK_MASQ in ln and "LOCAL" not in ln for ln in rules)
    assert _dnat(r, svl) == {"10.244.3.2"} and len(_dnat(r, svc_)) == 3
    # the ClusterIP keeps the cluster policy
    assert r.portals[0].endswith(svc_)
    # no local endpoint: outside clients fall through to filter's DROP
    r = R.service_rules(view(sp, _mixed()[:2]), CIDR)
    assert r.chains[ext][-1].endswith(svc_)  # only the pod/LOCAL short-cuts remain
    drops = [ln for ln in r.rejects if ln.endswith("-j DROP")]
    assert len(drops) == 2  # the nodePort and the external IP


def test_external_cluster_masquerades_and_spreads() -> None:
    sp = ServicePort("default/web", "", "UDP", "10.96.0.20", 53, node_port=30053,
                     external_ips=("10.235.0.77",))  # fmt: skip
    r = R.service_rules(view(sp, _mixed()), CIDR)
    assert r.chains[R.ext_chain(sp)] == [
        f"-A {R.ext_chain(sp)} -j {R.MARK_MASQ}",
        f"-A {R.ext_chain(sp)} -j {R.svc_chain(sp)}",
    ]
    r = R.service_rules(view(sp, ()), CIDR)
    assert len(r.rejects) == 3 and all("icmp-port-unreachable" in ln for ln in r.rejects)
    top = R.dispatch_rules({"default/web": R.service_rules(view(sp, _mixed()), CIDR)})
    assert any(R.EXTERNALS in ln for ln in top[R.NAT_SERVICES])
    assert top[R.NAT_EXTERNALS]
