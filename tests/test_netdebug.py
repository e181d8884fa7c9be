"""corral.netdebug's pure logic: the iptables explainer, the checks, VXLAN decoding, the
debug socket's `resync` request. (The whole verbs run in integration/test_net_cli.py.)"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from corral.api.objects import IPAllocation, NetworkSpec, SubnetLease
from corral.daemon.debug import DebugServer, query
from corral.netdebug import check, decode, explain
from corral.netdebug.model import Allocation, ClusterView
from corral.proxy import rules as R
from corral.proxy.core import EndpointInfo, ServicePort, ServiceView

VIP = "10.96.0.50"
EPS = ("10.244.1.5", "10.244.2.5", "10.244.3.5")


def _proxy_dump(affinity: int | None, clients: dict[str, tuple[str, int]] | None = None) -> dict:
    """A proxy debug dump as `corral proxy` writes it, from the rules the mode writes."""
    sp = ServicePort("default/web", "", "TCP", VIP, 80, affinity_timeout=affinity)
    view = ServiceView((sp,), ((sp.key, tuple(EndpointInfo(ip, 8080) for ip in EPS)),))
    sr = R.service_rules(view, "10.244.0.0/16")
    chains = dict(sr.chains)
    chains[R.SERVICES] = list(sr.portals)
    sets: dict = {s: {"timeout": t, "entries": {}} for s, t in sr.sets.items()}
    for client, (ep, left) in (clients or {}).items():
        sets[R.affinity_set(sp, EndpointInfo(ep, 8080))]["entries"][client] = left
    return {"mode": "iptables", "kernel": {"nat": {"chains": chains}, "ipsets": sets}}


def test_explainer_names_the_affinity_backend_and_its_age() -> None:
    dump = _proxy_dump(600, {"10.244.9.9": (EPS[1], 500)})
    [entry] = explain.IptablesExplainer().table(dump)
    assert (entry.vip, entry.port, entry.protocol) == (VIP, 80, "TCP")
    assert sorted(entry.backends) == sorted(f"{ip}:8080" for ip in EPS)
    d = explain.IptablesExplainer().decide(dump, VIP, 80, "tcp", "10.244.9.9")
    assert d.backend == f"{EPS[1]}:8080"
    assert "affinity hit" in d.why and "100s ago" in d.why
    other = explain.IptablesExplainer().decide(dump, VIP, 80, "tcp", "10.244.9.10")
    assert other.backend is None and len(other.candidates) == 3 and "random" in other.why


def test_explainer_without_endpoints_says_reject() -> None:
    sp = ServicePort("default/empty", "", "TCP", VIP, 80)
    sr = R.service_rules(ServiceView((sp,)), "10.244.0.0/16")
    dump = {"kernel": {"nat": {"chains": {}}, "filter": {"chains": {R.SERVICES: sr.rejects}}}}
    d = explain.IptablesExplainer().decide(dump, VIP, 80, "TCP", "10.244.1.1")
    assert d.found and d.backend is None and "no endpoints" in d.why and "TCP reset" in d.why
    assert not explain.IptablesExplainer().decide(dump, VIP, 81, "TCP", "x").found


def test_unknown_mode_is_said_plainly() -> None:
    ex = explain.explainer({"components": {"proxy": {"debug": {"mode": "ebpf"}}}})
    assert "cannot explain" in ex.decide({}, VIP, 80, "TCP", "x").why


def _view() -> ClusterView:
    leases = {
        f"10.244.{i}.0/24": SubnetLease(
            subnet=f"10.244.{i}.0/24",
            node_name=f"n{i}",
            publicIP=f"10.250.0.{i}",
            vtepMAC=f"02:00:00:00:00:0{i}",
        )
        for i in (1, 2)
    }
    return ClusterView(NetworkSpec(), {}, leases, [], {}, {})


def _node_dump(fdb: bool = True, mtu: int = 1450) -> dict:
    mac, addrs = "02:00:00:00:00:01", ["10.244.1.0/32"]
    route = {"dst": "10.244.2.0/24", "gateway": "10.244.2.0", "dev": "corral.1"}
    kernel = {
        "device": {
            "mtu": mtu,
            "up": True,
            "mac": mac,
            "addresses": addrs,
            "vni": 1,
            "port": 4789,
            "local": "10.250.0.1",
        },
        "routes": [{**route, "onlink": True, "corral": True}],
        "neighbours": [{"ip": "10.244.2.0", "mac": "02:00:00:00:00:02", "state": "permanent"}],
        "fdb": [{"mac": "02:00:00:00:00:02", "dst": "10.250.0.2"}] if fdb else [],
    }
    return {"components": {"overlay": {"debug": {"kernel": kernel, "underlayMTU": 1500}}}}


def test_check_overlay_finds_a_missing_fdb_entry_with_its_repair() -> None:
    assert check.check_overlay(_view(), "n1", _node_dump(), "corral.1") == []
    [f] = check.check_overlay(_view(), "n1", _node_dump(fdb=False), "corral.1")
    assert "FDB entry 02:00:00:00:00:02 -> 10.250.0.2" in f.what and f.how == "kernel"
    assert f.argv == [
        "bridge", "fdb", "replace", "02:00:00:00:00:02", "dev", "corral.1",
        "dst", "10.250.0.2", "self", "permanent",
    ]  # fmt: skip


def test_check_overlay_finds_a_changed_mtu() -> None:
    [f] = check.check_overlay(_view(), "n1", _node_dump(mtu=1400), "corral.1")
    assert "MTU is 1400" in f.what and f.argv[-1] == "1450"


def _alloc(ip: str, created: str) -> Allocation:
    a = IPAllocation(
        ip=ip, pool="p", containerID="c" * 64, ifname="eth0", node_name="n1", created_at=created
    )
    return Allocation(f"/k/{ip}", "/o/" + ip, a)


def test_a_young_allocation_is_an_add_in_flight_not_a_leak() -> None:
    cv = _view()
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    cv.allocations = [_alloc("10.244.1.9", now), _alloc("10.244.1.10", "2020-01-01T00:00:00Z")]
    cv.owners = {"/o/10.244.1.9": "10.244.1.9", "/o/10.244.1.10": "10.244.1.10"}
    dumps = {"n1": check.NodeDumps(node={"components": {"overlay": {"debug": {"links": []}}}})}
    [f] = check.check_ipam(cv, dumps)
    assert "leaked IP 10.244.1.10" in f.what and f.how == "release"


def test_vxlan_packet_decodes_to_one_line() -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    pkt = Ether(
        bytes(
            Ether()
            / IP(src="10.250.0.1", dst="10.250.0.2")
            / UDP(sport=40000, dport=4789)
            / VXLAN(vni=1)
            / Ether()
            / IP(src="10.244.1.2", dst="10.244.2.2")
            / TCP(sport=1234, dport=80, flags="S")
        )
    )
    rec = decode.decode(pkt)
    assert rec is not None and rec["vni"] == 1
    rec["iface"] = "eth0"
    assert decode.line(rec) == (
        "eth0             VXLAN vni 1 10.250.0.1 > 10.250.0.2 | "
        "TCP 10.244.1.2:1234 > 10.244.2.2:80 [S]"
    )
    assert decode.matches(rec, "10.244.1.2", {"10.244.2.2"}, 1234)
    assert not decode.matches(rec, "10.244.1.2", {"10.244.2.2"}, 1235)


async def test_debug_socket_answers_resync(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    asked = []
    path = os.path.join(str(tmp_path), "d.sock")
    srv = DebugServer(
        path, lambda: {"state": 1}, {"resync": lambda: asked.append(1) or {"resync": ["x"]}}
    )
    await srv.start()
    try:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, query, path) == {"state": 1}
        got = await loop.run_in_executor(None, lambda: query(path, request="resync"))
        assert got == {"resync": ["x"]} and asked == [1]
        bad = await loop.run_in_executor(None, lambda: query(path, request="reboot"))
        assert "unknown request" in bad["error"]
    finally:
        await srv.stop()


def test_an_ip_in_use_but_not_allocated_is_not_called_an_orphan() -> None:
    from corral.api.objects import Pod

    cv = _view()
    pod = Pod.model_validate(
        {
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "x", "command": ["sleep"]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.7"},
        }
    )
    cv.pods = [pod]
    link = {"name": "veth1", "pod": {"ip": "10.244.1.7", "mac": "x"}, "up": True}
    dumps = {"n1": check.NodeDumps(node={"components": {"overlay": {"debug": {"links": [link]}}}})}
    [f] = check.check_ipam(cv, dumps)
    assert "in use by default/p" in f.what and "not allocated" in f.what and f.how is None
    pod.status.pod_ip = None
    [f] = check.check_ipam(cv, dumps)
    assert "orphan veth veth1" in f.what


def test_trace_targets_parse() -> None:
    from corral.netdebug.trace import _TARGET

    def parse(t: str) -> tuple:
        m = _TARGET.match(t)
        assert m is not None, t
        return m["host"], m["port"], m["proto"]

    assert parse("web") == ("web", None, None)
    assert parse("default/web:80/tcp") == ("default/web", "80", "tcp")
    assert parse("dns.corral-system.svc.cluster.local:53/udp")[1:] == ("53", "udp")
    assert parse("10.244.1.2/icmp") == ("10.244.1.2", None, "icmp")


def test_a_sandbox_without_its_veth_has_lost_its_network() -> None:
    cv = _view()
    pods = {"default/p": {"ip": "10.244.1.7", "gone": False, "terminating": False}}
    dump = {"components": {"overlay": {"debug": {"links": []}}, "pods": {"debug": {"pods": pods}}}}
    [f] = check.check_ipam(cv, {"n1": check.NodeDumps(node=dump)})
    assert "lost its network" in f.what and f.fix.startswith("corral delete pod p")


def test_a_device_with_another_vni_is_reported() -> None:
    d = _node_dump()
    d["components"]["overlay"]["debug"]["kernel"]["device"]["vni"] = 7
    [f] = check.check_overlay(_view(), "n1", d, "corral.1")
    assert "VNI 7" in f.what and f.how == "resync-node"


# ------------------------------------------------------------ the check table's pure parts


def test_compare_functions_say_nothing_when_both_sides_agree() -> None:
    route = {"gateway": "10.244.2.0", "dev": "corral.1"}
    assert check._route("10.244.2.0/24", ("10.244.2.0", "corral.1", "n2"), route) is None
    d = check._route("10.244.2.0/24", ("10.244.2.0", "corral.1", "n2"), None)
    assert d is not None and d.what == "route to 10.244.2.0/24 (n2) missing" and d.have == "none"
    d = check._route("10.244.2.0/24", ("10.244.2.0", "corral.1", "n2"), {**route, "dev": "eth0"})
    assert d is not None and d.what.endswith("is via 10.244.2.0 dev eth0")
    neigh = {"mac": "02:00:00:00:00:02", "state": "permanent"}
    assert check._neighbour("10.244.2.0", ("02:00:00:00:00:02", "n2"), neigh) is None
    d = check._neighbour("10.244.2.0", ("02:00:00:00:00:02", "n2"), {**neigh, "state": "stale"})
    assert d is not None and d.have == "02:00:00:00:00:02 stale"
    assert check._fdb("02:00:00:00:00:02", ("10.250.0.2", "n2"), ["10.250.0.2"]) is None
    d = check._fdb("02:00:00:00:00:02", ("10.250.0.2", "n2"), ["10.250.0.2", "10.250.0.9"])
    assert d is not None and "points at 10.250.0.2, 10.250.0.9" in d.what
    assert check._mtu("corral.1", 1450, 1450) is None
    assert check._vtep_mac("corral.1", "02:AA:00:00:00:01", "02:aa:00:00:00:01") is None


def test_an_entry_walks_etcds_keys_or_the_nodes_and_skips_what_etcd_does_not_ask() -> None:
    side = check.NodeSide(_view(), "n1", {}, "corral.1")
    missing = check.Compared(
        "x", "overlay", lambda s: {"a": 1, "b": 2}, lambda s: {"a": 1, "c": 3},
        lambda k, w, h: None if w == h else check.Diff(f"{k}: {w} vs {h}"),
        lambda s, k, w, h: check.Repair("kernel", ["fix", k]),
    )  # fmt: skip
    [f] = missing.findings(side)
    assert (f.node, f.what, f.argv) == ("n1", "b: 2 vs None", ["fix", "b"])
    stale = check.Compared(
        "x", "overlay", lambda s: {"a": 1}, lambda s: {("a", 1): 1, ("c", 1): 3},
        check._stale(lambda k, h: f"stale {k[0]}"), lambda s, k, w, h: check.Repair(),
        walk="have", match=lambda k: k[0],
    )  # fmt: skip
    assert [f.what for f in stale.findings(side)] == ["stale c"]
    unasked = check.Compared("x", "overlay", lambda s: None, lambda s: {"c": 3}, stale.compare,
                             stale.fix, walk="have")  # fmt: skip
    assert unasked.findings(side) == []


def test_every_table_entry_has_its_own_name() -> None:
    names = [c.name for t in (check.OVERLAY, check.FASTPATH, check.PROXY, check.IPAM) for c in t]
    assert len(names) == len(set(names))


def test_a_node_port_service_without_endpoints_is_compared_by_its_vip() -> None:
    sp = ServicePort("default/empty", "", "TCP", VIP, 80, node_port=30080)
    sr = R.service_rules(ServiceView((sp,)), "10.244.0.0/16")
    assert len(sr.rejects) == 2  # the VIP's REJECT and the node port's
    cv = _view()
    cv.views = lambda: {"default/empty": ServiceView((sp,))}  # type: ignore[method-assign]
    hooks = {h: [f"-A {h} -j {R.SERVICES}"] for h in ("PREROUTING", "OUTPUT")}
    kernel = {"nat": {"chains": {}, "hooks": hooks}, "filter": {"chains": {R.SERVICES: []}}}
    dump = {"components": {"proxy": {"debug": {"mode": "iptables", "kernel": kernel}}}}
    [f] = check.check_proxy(cv, "n1", dump)
    assert f.what == f"default/empty: no REJECT for {VIP}/32 (a service without endpoints)"
    kernel["filter"]["chains"][R.SERVICES] = sr.rejects
    assert check.check_proxy(cv, "n1", dump) == []


# ------------------------------------------------------------ trace's hop steps


def _tracer(fast: bool, route: bool = True) -> Any:
    from corral.netdebug import trace

    veth = {"name": "veth1", "pod": {"ip": "10.244.1.5"}, "programs": ["from_pod"] if fast else []}
    kernel = {
        "routes": [{"dst": "10.244.2.0/24", "gateway": "10.244.2.0", "dev": "corral.1",
                    "onlink": True}] if route else [],
        "neighbours": [{"ip": "10.244.2.0", "mac": "02:00:00:00:00:02", "state": "permanent"}],
        "fdb": [{"mac": "02:00:00:00:00:02", "dst": "10.250.0.2"}],
    }  # fmt: skip
    peers = [{"gateway": "10.244.2.0", "underlayIP": "10.250.0.2", "vtepMAC": "02:00:00:00:00:02"}]
    ov = {"datapath": "bpf", "links": [veth], "kernel": kernel, "fastpathMaps": {"peers": peers}}
    n1 = check.NodeDumps(node={"components": {"overlay": {"debug": ov}}})
    dumps = {"n1": n1, "n2": check.NodeDumps()}
    src = trace.Source("default", "c", "n1", "10.244.1.5", n1, veth, None)
    return trace.Tracer(_view(), {}, dumps, src, 1.0)


def test_trace_plans_the_fast_path_or_the_kernels_and_says_why() -> None:
    from corral.netdebug import trace

    hops = trace._path(_tracer(fast=True), "10.244.2.7", via_vip=False)
    assert [h.step for h in hops] == [
        "routing", "vxlan encap", "destination node", "destination pod",
    ]  # fmt: skip
    assert hops[0].decision.startswith("fast path: from_pod on veth1 encapsulates itself")
    assert hops[1].status == "planned" and "fast path's own copy" in hops[1].decision
    assert "node agent is unreachable" in hops[2].decision
    assert hops[3].status == "broken" and "MISSING" in hops[3].decision  # no veth known on n2
    [routing, *_] = trace._path(_tracer(fast=False, route=False), "10.244.2.7", via_vip=False)
    assert routing.status == "broken"
    assert routing.decision == (
        "kernel: from_pod is not attached to veth1: route to 10.244.2.0/24 MISSING"
    )
    [routing, *_] = trace._path(_tracer(fast=True), "10.244.2.7", via_vip=True)
    assert routing.decision.startswith("kernel: the packet was DNATed by netfilter")


def test_trace_confirms_the_hops_whose_sniffer_saw_the_probe() -> None:
    from corral.netdebug import trace

    hops = [trace.Hop(step, "n1", "", probe=p) for step, p in
            (("a", "src"), ("b", "out"), ("c", "in"), ("d", None))]  # fmt: skip
    sniffed = {"src": {"*": "seen"}, "out": {"_error": "no such device"}, "in": {"10.9.9.9": "x"}}
    trace._confirm(hops, sniffed, "10.244.2.7")
    assert [h.status for h in hops] == ["confirmed", "unchecked", "refuted", "planned"]
    assert trace._first(hops, ("refuted", "broken")) == 2


def test_agent_argv_leaves_out_unset_flags_and_repeats_lists() -> None:
    from corral.netdebug.access import NodeAccess
    from corral.netdebug.trace import agent_argv

    acc = NodeAccess("n1", python="py")
    argv = agent_argv(acc, "sniff", iface=["eth0", "veth1"], host=None, vni=0, raw=True, x=False)
    assert argv == [
        "py", "-m", "corral.netdebug.agent", "sniff",
        "--iface", "eth0", "--iface", "veth1", "--vni", "0", "--raw",
    ]  # fmt: skip
