"""The NetworkPolicy engine against the upstream netpol truth tables (pure logic).

The model of Kubernetes' e2e suite (test/e2e/network/netpol): namespaces x, y, z,
each with pods a, b, c (label pod=<name>) serving on 80 and 81 (named
serve-80-tcp, serve-81-tcp ...). Each case writes the expected table as "who may
reach whom" and compares every pair.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from corral.api.objects import NetworkPolicy
from corral.netpolicy.model import Model, PodInfo

NS = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL = [f"{n}/{p}" for n in NS for p in PODS]


def ip(key: str) -> str:
    ns, pod = key.split("/")
    return f"10.244.{NS.index(ns) + 1}.{PODS.index(pod) + 10}"


def pods() -> list[PodInfo]:
    named = {
        f"serve-{port}-{proto.lower()}": (port, proto)
        for port in (80, 81)
        for proto in ("TCP", "UDP", "SCTP")
    }
    return [
        PodInfo(k.split("/")[0], k.split("/")[1], ip(k), {"pod": k.split("/")[1]}, named)
        for k in ALL
    ]


NAMESPACES = {n: {"ns": n, "kubernetes.io/metadata.name": n} for n in NS}


def policy(ns: str, name: str, spec: dict) -> NetworkPolicy:
    return NetworkPolicy.model_validate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


def table(m: Model, port: int = 80, proto: str = "TCP") -> dict[tuple[str, str], bool]:
    return {
        (s, d): m.verdict(ip(s), ip(d), proto, port).allowed for s, d in itertools.product(ALL, ALL)
    }


def expect(fn: Callable[[str, str], bool]) -> dict[tuple[str, str], bool]:
    return {(s, d): fn(s, d) for s, d in itertools.product(ALL, ALL)}


def diff(got: dict, want: dict) -> list[str]:
    return [
        f"{s} -> {d}: got {got[s, d]}, want {w}" for (s, d), w in want.items() if got[s, d] != w
    ]


def check(policies: list[NetworkPolicy], fn: Callable[[str, str], bool], **probe) -> Model:
    m = Model(pods(), NAMESPACES, policies)
    assert diff(table(m, **probe), expect(fn)) == []
    return m


def test_no_policy_allows_everything():
    check([], lambda s, d: True)


def test_default_deny_ingress():
    m = check(
        [policy("x", "deny-all", {"podSelector": {}})],
        lambda s, d: not d.startswith("x/"),
    )
    v = m.verdict(ip("y/a"), ip("x/b"), "TCP", 80)
    assert not v.allowed and v.deciding.direction == "Ingress"
    assert "default deny" in v.deciding.reason and "x/deny-all" in v.deciding.reason


def test_default_deny_egress():
    check(
        [policy("x", "deny-egress", {"podSelector": {}, "policyTypes": ["Egress"]})],
        lambda s, d: not s.startswith("x/"),
    )


def test_pod_selector_in_own_namespace():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
    }
    m = check([policy("x", "allow-b", spec)], lambda s, d: d != "x/a" or s == "x/b")
    v = m.verdict(ip("x/b"), ip("x/a"), "TCP", 80)
    assert v.allowed and (v.deciding.policy, v.deciding.rule) == ("x/allow-b", 0)


def test_namespace_selector():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
    }
    check([policy("x", "from-y", spec)], lambda s, d: d != "x/a" or s.startswith("y/"))


def test_namespace_selector_by_kubernetes_name_label():
    spec = {
        "podSelector": {},
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/metadata.name",
                                    "operator": "In",
                                    "values": ["y", "z"],
                                }
                            ]
                        }
                    }
                ]
            }
        ],
    }
    check([policy("x", "yz", spec)], lambda s, d: not d.startswith("x/") or s[0] in "yz")


def test_namespace_and_pod_selector_together():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"ns": "y"}},
                        "podSelector": {"matchLabels": {"pod": "c"}},
                    }
                ]
            }
        ],
    }
    check([policy("x", "yc", spec)], lambda s, d: d != "x/a" or s == "y/c")


def test_namespace_or_pod_selector_as_two_peers():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                    {"podSelector": {"matchLabels": {"pod": "c"}}},
                ]
            }
        ],
    }
    check([policy("x", "y-or-c", spec)], lambda s, d: d != "x/a" or s[0] == "y" or s == "x/c")


def test_empty_namespace_selector_is_every_namespace():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}
        ],
    }
    check([policy("x", "any-b", spec)], lambda s, d: d != "x/a" or s.endswith("/b"))


def test_ip_block_with_except():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}
        ],
    }
    check([policy("x", "no-y", spec)], lambda s, d: d != "x/a" or not s.startswith("y/"))


def test_egress_ip_block_with_except():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"{ip('z/b')}/32"]}}]}],
    }
    check([policy("x", "not-zb", spec)], lambda s, d: s != "x/a" or d != "z/b")


@pytest.mark.parametrize(("port", "allowed"), [(80, True), (81, False)])
def test_named_port_ingress(port, allowed):
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": "serve-80-tcp"}]}],
    }
    check([policy("x", "named", spec)], lambda s, d: d != "x/a" or allowed, port=port)


def test_named_port_resolves_on_each_pod():
    # x/b names 81 "web", x/a names 80 "web": one rule, a different port per pod.
    ps = pods()
    ps = [
        PodInfo(p.namespace, p.name, p.ip, p.labels, {"web": (81 if p.name == "b" else 80, "TCP")})
        for p in ps
    ]
    spec = {"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]}
    m = Model(ps, NAMESPACES, [policy("x", "web", spec)])
    assert m.verdict(ip("y/a"), ip("x/a"), "TCP", 80).allowed
    assert not m.verdict(ip("y/a"), ip("x/a"), "TCP", 81).allowed
    assert m.verdict(ip("y/a"), ip("x/b"), "TCP", 81).allowed
    assert not m.verdict(ip("y/a"), ip("x/b"), "TCP", 80).allowed
    egress = {
        "podSelector": {},
        "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "web"}]}],
    }
    m = Model(ps, NAMESPACES, [policy("y", "web", egress)])
    assert m.verdict(ip("y/a"), ip("x/b"), "TCP", 81).allowed
    assert not m.verdict(ip("y/a"), ip("x/b"), "TCP", 80).allowed
    assert not m.verdict(ip("y/a"), "10.1.2.3", "TCP", 80).allowed  # no pod: no names


def test_named_port_of_another_protocol_matches_nothing():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": "serve-80-udp", "protocol": "TCP"}]}],
    }
    check([policy("x", "wrong", spec)], lambda s, d: d != "x/a")


@pytest.mark.parametrize(("end", "open81"), [(81, True), (80, False)])
def test_end_port(end, open81):
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": 80, "endPort": end}]}],
    }
    check([policy("x", "range", spec)], lambda s, d: True, port=80)
    check([policy("x", "range", spec)], lambda s, d: d != "x/a" or open81, port=81)


def test_protocol_is_part_of_the_port():
    spec = {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "UDP"}]}]}
    check([policy("x", "udp", spec)], lambda s, d: not d.startswith("x/"), proto="TCP")
    check([policy("x", "udp", spec)], lambda s, d: True, proto="UDP")
    check([policy("x", "udp", spec)], lambda s, d: not d.startswith("x/"), proto="SCTP")


def test_multiple_policies_are_a_union():
    from_b = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
    }
    from_z = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
    }
    deny = {"podSelector": {}}
    m = check(
        [policy("x", "from-b", from_b), policy("x", "from-z", from_z), policy("x", "deny", deny)],
        lambda s, d: not d.startswith("x/") or (d == "x/a" and (s == "x/b" or s.startswith("z/"))),
    )
    v = m.verdict(ip("z/c"), ip("x/a"), "TCP", 80)
    assert (v.deciding.policy, v.deciding.rule) == ("x/from-z", 0)


def test_allow_all_rule_overrides_deny():
    check(
        [
            policy("x", "deny", {"podSelector": {}}),
            policy("x", "allow", {"podSelector": {}, "ingress": [{}]}),
        ],
        lambda s, d: True,
    )


def test_egress_rules_default_policy_types_to_both():
    spec = {"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"to": [{"podSelector": {}}]}]}
    pol = policy("x", "eg", spec)
    assert pol.spec.policy_types == ["Ingress", "Egress"]
    check(
        [pol],
        lambda s, d: d != "x/a" and (s != "x/a" or d.startswith("x/")),
    )


def test_egress_to_namespace_on_one_port():
    spec = {
        "podSelector": {},
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}
        ],
    }
    check([policy("x", "to-y", spec)], lambda s, d: not s.startswith("x/") or d.startswith("y/"))
    check([policy("x", "to-y", spec)], lambda s, d: not s.startswith("x/"), port=81)


def test_match_expressions_select_pods():
    spec = {
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]},
        "ingress": [],
    }
    check([policy("y", "not-a", spec)], lambda s, d: not d.startswith("y/") or d == "y/a")


def test_policy_selects_only_its_own_namespace():
    check([policy("z", "deny", {"podSelector": {}})], lambda s, d: not d.startswith("z/"))


def test_effective_policy_lists_the_rules():
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}
        ],
    }
    m = Model(pods(), NAMESPACES, [policy("x", "p", spec)])
    pp = m.policy_of(m.by_key["x/a"])
    assert pp.ingress.policies == ["x/p"] and not pp.egress.isolated
    (allow,) = pp.ingress.allows
    assert allow.peers == (f"{ip('x/b')}/32",)
    assert allow.describe() == f"x/p rule 0: {ip('x/b')}/32 on TCP/80"
    assert not m.policy_of(m.by_key["x/b"]).ingress.isolated


def test_net_policy_view_and_trace_verdict_from_the_cluster_view():
    from corral.api.objects import Namespace, NetworkSpec, Pod
    from corral.netdebug import policy as netdebug_policy
    from corral.netdebug.model import ClusterView

    def pod(key: str) -> Pod:
        ns, name = key.split("/")
        return Pod.model_validate(
            {
                "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "command": ["x"]}]},
                "status": {"phase": "Running", "podIP": ip(key)},
            }
        )

    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}
        ],
    }
    cv = ClusterView(
        spec=NetworkSpec(),
        nodes={},
        leases={},
        pods=[pod(k) for k in ALL],
        services={},
        slices={},
        namespaces=[Namespace.model_validate({"metadata": {"name": n}}) for n in NS],
        policies=[policy("x", "from-y", spec)],
    )
    doc = netdebug_policy.effective(cv, "x/a")
    assert doc["ingress"]["policies"] == ["x/from-y"] and not doc["egress"]["isolated"]
    assert doc["ingress"]["allow"][0].startswith("x/from-y rule 0: 10.244.2.")
    programmed = {k: doc[k] for k in ("ip", "ingress", "egress")}
    assert netdebug_policy.effective(cv, "x/a", {"pods": {"x/a": programmed}})["node_agrees"]
    assert not netdebug_policy.effective(cv, "x/a", {"pods": {}})["node_agrees"]
    assert netdebug_policy.verdict(cv, ip("y/c"), ip("x/a"), "tcp", 80).allowed
    v = netdebug_policy.verdict(cv, ip("z/c"), ip("x/a"), "tcp", 80)
    assert not v.allowed and "x/from-y" in v.deciding.reason
    with pytest.raises(netdebug_policy.PolicyError):
        netdebug_policy.effective(cv, "x/nope")


def test_an_ipv6_block_becomes_no_rule_not_an_open_one():
    from corral.netpolicy import rules

    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8::/32"}}]}],
    }
    m = check([policy("x", "v6", spec)], lambda s, d: d != "x/a")
    chain = rules.pod_chain("Ingress", m.policy_of(m.by_key["x/a"]))
    assert len(chain) == 1 and chain[0].endswith("-j DROP")
