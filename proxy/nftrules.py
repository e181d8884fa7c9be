"""The nftables mode's ruleset: a pure function of the service views (no kernel here).

kube-proxy's nftables layout (pkg/proxy/nftables, KEP-3866) in one table of
corral's own per node, `ip corral-<node>`, so it never meets the iptables
mode's chains, iptables-nft rules of other software, or another cluster's
proxy:

  nat-prerouting, nat-output (dstnat)  -> services
  services                             `ip daddr . meta l4proto . th dport vmap
                                       @service-ips`; local destinations (not
                                       127/8): `meta l4proto . th dport vmap
                                       @service-nodeports`
  service-ips, service-nodeports       verdict maps: VIP.proto.port (proto.nodePort)
                                       -> goto svc-<h>-<ns>/<name>/<proto>/<port>
  svc-...                              nodePort traffic (destination not the VIP)
                                       and clients outside the pod network ->
                                       mark-for-masquerade; then endpoint i of n:
                                       `numgen random mod (n-i) 0 dnat to ip:port`
                                       (the last: plain `dnat`), see below
  with ClientIP affinity, per endpoint a chain: the service chain sends a client
  in `@aff-<ep>` to its endpoint first, the cascade ends in `goto ep-...`, and
  ep-...__<ip>/<port>                  `update @aff-<ep> { ip saddr timeout T }`;
                                       `dnat to ip:port`
  aff-...                              one set per (service port, endpoint), flags
                                       dynamic,timeout: a client stays with the
                                       endpoint while it keeps coming back within T
  nat-postrouting (srcnat)             -> masquerading: hairpin (`ip saddr . ip
                                       daddr @hairpin`, a pair `ip . ip` per
                                       endpoint address: a pod reaching itself)
                                       -> mark; marked -> clear the bit,
                                       `masquerade fully-random`
  filter-input/-forward/-output        `ct state new` -> no-endpoints: the maps
  (filter - 10)                        no-endpoint-services / -nodeports -> goto
                                       reject-chain (TCP reset for TCP, ICMP port
                                       unreachable otherwise)

Why a numgen cascade and not kube-proxy's `numgen random mod N vmap { ... }`:
each such rule makes an anonymous set, and the kernel (6.18 here) allocates an
anonymous set's name by scanning every set of the table and binds it by
walking the transaction: quadratic in the number of services. At 10,000
services x 3 endpoints the first sync took 40 s with the vmaps (perf: most of
it in __nft_set_trans_bind and nf_tables_newset); the cascade draws the same
uniform choice (endpoint i takes 1/(n-i) of what is left) with named objects
only.

Why no per-endpoint chain without affinity (kube-proxy has one per endpoint for
its hairpin mark and DNAT): libnftables 1.0.6 dumps every chain of the family
into its cache before any transaction that adds a rule or an element, so a
sync's cost grows with the number of chains; at 10,000 services x 3 endpoints
that dump was ~110 of a partial sync's ~140 ms. The hairpin check moved to one
set in postrouting (after DNAT a hairpinned packet's source equals its
destination), which leaves one chain per service port.

Dispatch is one hash lookup in a map whatever the number of services, and a
change touches only the elements and chains of the services that changed
(`partial`); `full` rewrites every chain and map in the same one transaction.
A ServicePort's chains and sets have deterministic names, so a restarted proxy
rewrites them in place and affinity sets keep their clients.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from corral.proxy.core import (
    EndpointInfo,
    ServicePort,
    ServiceView,
    cluster_endpoints,
    external_endpoints,
    refusal,
    usable,
)

FAMILY = "ip"
MASQ_MARK = "0x4000"
# the maps: name -> key type
MAPS = {
    "service-ips": "ipv4_addr . inet_proto . inet_service",
    "service-nodeports": "inet_proto . inet_service",
    "no-endpoint-services": "ipv4_addr . inet_proto . inet_service",
    "no-endpoint-nodeports": "inet_proto . inet_service",
}
REJECT = "reject-chain"
HAIRPIN = "hairpin"  # set of `ip . ip`: one pair per endpoint address
MARK = "mark-for-masquerade"
SERVICES = "services"
NO_ENDPOINTS = "no-endpoints"
MASQUERADING = "masquerading"
LOCAL = "fib daddr type local ip daddr != 127.0.0.0/8"
# base chain -> (type, hook, priority, its one rule)
BASE: dict[str, tuple[str, str, str, str]] = {
    "nat-prerouting": ("nat", "prerouting", "dstnat", f"jump {SERVICES}"),
    "nat-output": ("nat", "output", "-100", f"jump {SERVICES}"),
    "nat-postrouting": ("nat", "postrouting", "srcnat", f"jump {MASQUERADING}"),
    "filter-input": ("filter", "input", "filter - 10", f"ct state new jump {NO_ENDPOINTS}"),
    "filter-forward": ("filter", "forward", "filter - 10", f"ct state new jump {NO_ENDPOINTS}"),
    "filter-output": ("filter", "output", "filter - 10", f"ct state new jump {NO_ENDPOINTS}"),
}
# the fixed regular chains and their rules
FIXED: dict[str, list[str]] = {
    SERVICES: [
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        f"{LOCAL} meta l4proto . th dport vmap @service-nodeports",
    ],
    NO_ENDPOINTS: [
        "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        f"{LOCAL} meta l4proto . th dport vmap @no-endpoint-nodeports",
    ],
    # TCP: a reset (ICMP errors are rate limited per client); else port unreachable
    REJECT: ["meta l4proto tcp reject with tcp reset", "reject"],
    MARK: [f"meta mark set meta mark | {MASQ_MARK}"],
    MASQUERADING: [
        f"ct status dnat ip saddr . ip daddr @{HAIRPIN} jump {MARK}",
        f"meta mark & {MASQ_MARK} == 0 return",
        f"meta mark set meta mark ^ {MASQ_MARK}",
        "masquerade fully-random",
    ],
}
FIXED_CHAINS = (*BASE, *FIXED)
SVC_PREFIX, SVL_PREFIX, EXT_PREFIX = "svc-", "svl-", "ext-"
EP_PREFIX, AFF_PREFIX = "ep-", "aff-"
AFFINITY_SET_SIZE = 1 << 20  # clients per endpoint (nft's default for a dynamic set: 65535)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def table_name(node: str) -> str:
    """corral's table on node `node`: two proxies never share one, whatever the namespace."""
    return "corral-" + _UNSAFE.sub("_", node)[:200]


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:8].decode()


def _port_name(sp: ServicePort) -> str:
    ns, _, name = sp.service.partition("/")
    return f"{ns}/{name}/{sp.protocol.lower()}/{sp.name or sp.port}"


def svc_chain(sp: ServicePort) -> str:
    return f"{SVC_PREFIX}{_hash(sp.id)}-{_port_name(sp)}"


def svl_chain(sp: ServicePort) -> str:
    return f"{SVL_PREFIX}{_hash(sp.id)}-{_port_name(sp)}"


def ext_chain(sp: ServicePort) -> str:
    return f"{EXT_PREFIX}{_hash(sp.id)}-{_port_name(sp)}"


def ep_chain(sp: ServicePort, ep: EndpointInfo) -> str:
    return f"{EP_PREFIX}{_hash(f'{sp.id}>{ep.ip}:{ep.port}')}-{_port_name(sp)}__{ep.ip}/{ep.port}"


def affinity_set(sp: ServicePort, ep: EndpointInfo) -> str:
    return f"{AFF_PREFIX}{_hash(f'{sp.id}>{ep.ip}:{ep.port}')}-{_port_name(sp)}__{ep.ip}/{ep.port}"


def owned_chain(name: str) -> bool:
    return name.startswith((SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, EP_PREFIX))


def owned_set(name: str) -> bool:
    return name.startswith(AFF_PREFIX)


def _proto(sp: ServicePort) -> str:
    return sp.protocol.lower()


@dataclass
class ServiceRules:
    """The chains, sets and map elements of one service (all its ports)."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> rules
    sets: set[str] = field(default_factory=set)  # affinity sets
    elements: dict[str, dict[str, str]] = field(default_factory=dict)  # map -> key -> verdict
    hairpin: set[str] = field(default_factory=set)  # endpoint addresses

    def element(self, m: str, key: str, verdict: str) -> None:
        self.elements.setdefault(m, {})[key] = verdict


def _dispatch(
    sp: ServicePort, eps: tuple[EndpointInfo, ...], p: str, out: ServiceRules
) -> list[str]:
    """Rules choosing one of `eps` (evenly; with ClientIP affinity, a client's endpoint
    first); the per-endpoint chains and sets affinity needs go into `out`."""
    n = len(eps)
    picks = [f"numgen random mod {n - i} 0 " if i < n - 1 else "" for i in range(n)]
    if not sp.affinity_timeout:
        return [
            f"meta l4proto {p} {pick}dnat to {ep.ip}:{ep.port}"
            for pick, ep in zip(picks, eps, strict=True)
        ]
    rules = []
    chains = [(ep, ep_chain(sp, ep)) for ep in eps]
    for ep, chain in chains:
        s = affinity_set(sp, ep)
        out.sets.add(s)
        rules.append(f"ip saddr @{s} goto {chain}")
        out.chains[chain] = [
            f"update @{s} {{ ip saddr timeout {sp.affinity_timeout}s }}",
            f"meta l4proto {p} dnat to {ep.ip}:{ep.port}",
        ]
    return rules + [f"{pick}goto {c}" for pick, (_e, c) in zip(picks, chains, strict=True)]


NO_ENDPOINT_MAP = {
    "service-ips": "no-endpoint-services",
    "service-nodeports": "no-endpoint-nodeports",
}


def _refuse(all_eps: tuple[EndpointInfo, ...]) -> str:
    """A path with no endpoint under its policy: rejected when the service has none at
    all, dropped when it has some elsewhere (kube-proxy's answers)."""
    return f"goto {REJECT}" if refusal(all_eps) == "REJECT" else "drop"


def service_rules(view: ServiceView, cluster_cidr: str) -> ServiceRules:
    """One service's chains and map elements, with the iptables mode's structure
    (proxy/rules.py): svc- over every usable endpoint, svl- over the node's own (for a
    Local policy), ext- for NodePort, externalIP and LoadBalancer traffic. External
    traffic under Cluster is masqueraded and goes to svc-; under Local, pods and the
    node's own processes go cluster-wide (svc-, the processes masqueraded) and the rest
    reaches a local endpoint with the client's address kept, or is dropped when there
    is none (the no-endpoint maps, which the filter hooks read)."""
    out = ServiceRules()
    for sp in view.ports:
        all_eps = view.endpoints_of(sp)
        everywhere = usable(all_eps)
        local = usable(tuple(e for e in all_eps if e.local))
        internal = cluster_endpoints(sp, all_eps)
        external = external_endpoints(sp, all_eps) if sp.external else ()
        ext = sp.external and bool(external or (sp.external_local and everywhere))
        want_svc = bool(everywhere) and ((bool(internal) and not sp.internal_local) or ext)
        want_svl = bool(local) and (
            (bool(internal) and sp.internal_local) or (ext and sp.external_local)
        )
        p = _proto(sp)
        svc, svl = svc_chain(sp), svl_chain(sp)
        for wanted, chain, eps in ((want_svc, svc, everywhere), (want_svl, svl, local)):
            if wanted:
                out.chains[chain] = [  # off-cluster clients of the VIP (the node's own too)
                    f"ip daddr {sp.cluster_ip} ip saddr != {cluster_cidr} jump {MARK}",
                    *_dispatch(sp, eps, p, out),
                ]
                out.hairpin |= {ep.ip for ep in eps}
        vip_key = f"{sp.cluster_ip} . {p} . {sp.port}"
        if internal:
            out.element("service-ips", vip_key, f"goto {svl if sp.internal_local else svc}")
        else:
            out.element("no-endpoint-services", vip_key, _refuse(all_eps))
        if not sp.external:
            continue
        ext_keys = [("service-ips", f"{ip} . {p} . {sp.port}") for ip in sp.external_ips]
        if sp.node_port:
            ext_keys.append(("service-nodeports", f"{p} . {sp.node_port}"))
        if ext:
            e = ext_chain(sp)
            if sp.external_local:
                rules = [
                    f"ip saddr {cluster_cidr} goto {svc}",  # pods: cluster-wide
                    f"fib saddr type local jump {MARK}",  # the node's own processes
                    f"fib saddr type local goto {svc}",
                ]
                if external:
                    rules.append(f"goto {svl}")  # the client's address kept
            else:
                rules = [f"jump {MARK}", f"goto {svc}"]
            out.chains[e] = rules
            for m, key in ext_keys:
                out.element(m, key, f"goto {e}")
        if not external:  # what no chain translated: dropped or rejected in filter
            for m, key in ext_keys:
                out.element(NO_ENDPOINT_MAP[m], key, _refuse(all_eps))
    return out


class Tx:
    """One transaction's commands, in the order the kernel needs them: tables, sets and
    chains made before anything refers to them; references dropped before what they
    referred to is deleted."""

    def __init__(self, table: str) -> None:
        self.t = f"{FAMILY} {table}"
        self.head: list[str] = []  # table, maps, sets, chain declarations (and flushes)
        self.rules: list[str] = []
        self.elements: list[str] = []
        self.tail: list[str] = []  # element deletes, then chain and set deletes
        self.deletes: list[str] = []
        self.rule_count = 0

    def declare_chain(self, name: str, flush: bool) -> None:
        self.head.append(f"add chain {self.t} {name}")
        if flush:
            self.head.append(f"flush chain {self.t} {name}")

    def chain(self, name: str, rules: list[str], flush: bool = True) -> None:
        self.declare_chain(name, flush)
        self.rules += [f"add rule {self.t} {name} {r}" for r in rules]
        self.rule_count += len(rules)

    def add_set(self, name: str) -> None:
        self.head.append(
            f"add set {self.t} {name} {{ type ipv4_addr; flags dynamic,timeout; "
            f"size {AFFINITY_SET_SIZE}; }}"
        )

    def add_elements(self, m: str, items: Iterable[tuple[str, str]]) -> None:
        body = ", ".join(f"{k} : {v}" for k, v in items)
        if body:
            self.elements.append(f"add element {self.t} {m} {{ {body} }}")

    def add_keys(self, s: str, keys: Iterable[str]) -> None:
        body = ", ".join(keys)
        if body:
            self.elements.append(f"add element {self.t} {s} {{ {body} }}")

    def delete_keys(self, s: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self.add_keys(s, keys)
            self.tail.append(f"delete element {self.t} {s} {{ {', '.join(keys)} }}")

    def delete_elements(self, m: str, items: Iterable[tuple[str, str]]) -> None:
        """Delete elements whether or not the kernel still holds them (kube-proxy's
        trick: add, then delete, in one transaction)."""
        items = list(items)
        if items:
            self.add_elements(m, items)
            keys = ", ".join(k for k, _v in items)
            self.tail.append(f"delete element {self.t} {m} {{ {keys} }}")

    def delete_chain(self, name: str) -> None:
        self.tail.append(f"flush chain {self.t} {name}")  # its own jumps go first
        self.deletes.append(f"delete chain {self.t} {name}")

    def delete_set(self, name: str) -> None:
        self.deletes.append(f"delete set {self.t} {name}")

    def text(self) -> str:
        lines = self.head + self.rules + self.elements + self.tail + self.deletes
        return "\n".join(lines) + "\n" if lines else ""


def skeleton(tx: Tx, cluster_cidr: str) -> None:
    """The table, its maps, base and fixed chains with their rules (a full sync's start)."""
    tx.head.append(f"add table {tx.t}")
    for m, keytype in MAPS.items():
        tx.head.append(f"add map {tx.t} {m} {{ type {keytype} : verdict; }}")
        tx.head.append(f"flush map {tx.t} {m}")
    tx.head.append(f"add set {tx.t} {HAIRPIN} {{ type ipv4_addr . ipv4_addr; }}")
    tx.head.append(f"flush set {tx.t} {HAIRPIN}")
    for name, (kind, hook, prio, rule) in BASE.items():
        tx.head.append(
            f"add chain {tx.t} {name} {{ type {kind} hook {hook} priority {prio}; policy accept; }}"
        )
        tx.head.append(f"flush chain {tx.t} {name}")
        tx.rules.append(f"add rule {tx.t} {name} {rule}")
    for name, rules in FIXED.items():
        tx.chain(name, rules)


def full(
    table: str,
    per_service: Mapping[str, ServiceRules],
    cluster_cidr: str,
    kernel_chains: Iterable[str],
    kernel_sets: Iterable[str],
) -> Tx:
    """Every chain rewritten and every map refilled; owned chains and sets the kernel
    holds that nothing wants are deleted. Affinity sets that stay keep their clients."""
    tx = Tx(table)
    skeleton(tx, cluster_cidr)
    want_sets: set[str] = set()
    want_chains: set[str] = set()
    elements: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(per_service):
        r = per_service[key]
        want_sets |= r.sets
        for m, els in r.elements.items():
            elements.setdefault(m, []).extend(els.items())
    for s in sorted(want_sets):
        tx.add_set(s)
    have = set(kernel_chains)
    for key in sorted(per_service):
        for chain, rules in per_service[key].chains.items():
            want_chains.add(chain)
            tx.chain(chain, rules, flush=chain in have)
    for m in MAPS:
        tx.add_elements(m, elements.get(m, ()))
    ips = sorted({ip for r in per_service.values() for ip in r.hairpin})
    tx.add_keys(HAIRPIN, (f"{ip} . {ip}" for ip in ips))
    for c in sorted(have - want_chains):
        if owned_chain(c):
            tx.delete_chain(c)
    for s in sorted(set(kernel_sets) - want_sets):
        if owned_set(s):
            tx.delete_set(s)
    return tx


def hairpin_counts(per_service: Mapping[str, ServiceRules]) -> Counter[str]:
    """How many service ports DNAT to each endpoint address (a pair leaves `hairpin`
    with the last one)."""
    c: Counter[str] = Counter()
    for r in per_service.values():
        c.update(r.hairpin)
    return c


def partial(
    table: str,
    old: Mapping[str, ServiceRules | None],
    new: Mapping[str, ServiceRules | None],
    counts: Counter[str] | None = None,
) -> Tx:
    """The changes from `old` to `new` rules of the changed services only: chains whose
    rules changed are rewritten, gone ones deleted; map elements of these services
    added (again: a hand-deleted one comes back) or deleted. `counts` (the caller's
    `hairpin_counts`, updated here) decides which hairpin pairs come and go."""
    tx = Tx(table)
    if counts is not None:
        # verdict changes raise below before anything else: count on a copy
        counts_after = Counter(counts)
        came: set[str] = set()
        went: set[str] = set()
        for key in set(old) | set(new):
            before = (old.get(key) or ServiceRules()).hairpin
            after = (new.get(key) or ServiceRules()).hairpin
            for ip in after - before:
                counts_after[ip] += 1
                if counts_after[ip] == 1:
                    came.add(ip)
            for ip in before - after:
                counts_after[ip] -= 1
                if counts_after[ip] <= 0:
                    del counts_after[ip]
                    went.add(ip)
        tx.add_keys(HAIRPIN, (f"{ip} . {ip}" for ip in sorted(came - went)))
        tx.delete_keys(HAIRPIN, (f"{ip} . {ip}" for ip in sorted(went - came)))
    empty = ServiceRules()
    old_chains: dict[str, list[str]] = {}
    new_chains: dict[str, list[str]] = {}
    old_sets: set[str] = set()
    new_sets: set[str] = set()
    old_els: dict[str, dict[str, str]] = {}
    new_els: dict[str, dict[str, str]] = {}
    for side, chains, sets, els in (
        (old, old_chains, old_sets, old_els),
        (new, new_chains, new_sets, new_els),
    ):
        for key in sorted(side):
            r = side[key] or empty
            chains.update(r.chains)
            sets |= r.sets
            for m, e in r.elements.items():
                els.setdefault(m, {}).update(e)
    for s in sorted(new_sets - old_sets):
        tx.add_set(s)
    # endpoint chains before the service chains that jump to them (declaration order)
    for chain in sorted(new_chains, key=lambda c: not c.startswith(EP_PREFIX)):
        rules = new_chains[chain]
        if old_chains.get(chain) != rules:
            tx.chain(chain, rules, flush=chain in old_chains)
    for m in MAPS:
        want = new_els.get(m, {})
        had = old_els.get(m, {})
        # an element whose verdict changed must go before it is added again
        gone = [(k, v) for k, v in had.items() if k not in want]
        if any(want.get(k, v) != v for k, v in had.items()):
            # a delete and an add of one key cannot share a transaction in this order
            raise VerdictChanged(m)
        tx.delete_elements(m, gone)
        tx.add_elements(m, sorted(want.items()))
    for chain in sorted(set(old_chains) - set(new_chains)):
        tx.delete_chain(chain)
    for s in sorted(old_sets - new_sets):
        tx.delete_set(s)
    if counts is not None:
        counts.clear()
        counts.update(counts_after)
    return tx


class VerdictChanged(Exception):
    """A map key now dispatches elsewhere (never with these deterministic chain names):
    the caller does a full sync instead."""
