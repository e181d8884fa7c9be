"""The iptables mode's rules: a pure function of the service views (no kernel here).

kube-proxy's chain structure under a `CORRAL-` prefix, with deterministic hashed
names (so a restarted proxy rewrites the same chains in place):

nat table
  PREROUTING, OUTPUT -> CORRAL-SERVICES    one rule per VIP bucket in use (a bucket is
                                           the VIP's last octet): `-d 0.0.0.B/0.0.0.255
                                           -j CORRAL-BUCKET-<B>`, last: local
                                           destinations -> CORRAL-NODEPORTS
  CORRAL-BUCKET-<B>                        one rule per service port with endpoints whose
                                           VIP is in the bucket: `-d VIP -p P --dport N
                                           -j CORRAL-SVC-<h>`
  CORRAL-EXTERNALS                         per externalIP/LoadBalancer IP and port:
                                           -> EXT
  CORRAL-NODEPORTS                         per nodePort: -> EXT
  CORRAL-EXT-<h>                           external traffic (kube-proxy's EXT chain):
                                           policy Cluster: mark for masquerade, -> SVC;
                                           policy Local: pods -> SVC, the node's own
                                           processes -> mark, SVC; the rest -> SVL
                                           unmasqueraded (the client's address kept)
                                           or, with no local endpoint, on to filter's DROP
  CORRAL-SVL-<h>                           as SVC over the node's own endpoints only
                                           (internalTrafficPolicy or externalTrafficPolicy
                                           Local)
  CORRAL-SVC-<h>                           clients outside the pod network -> mark
                                           (node-local and other nodes' clients);
                                           affinity: a client in an endpoint's set
                                           -> that SEP; then the random cascade
                                           `statistic --mode random --probability
                                           1/(n-i)` over the endpoints
  CORRAL-SEP-<h>                           hairpin (source = the endpoint) -> mark;
                                           affinity: remember the client in the
                                           endpoint's set; DNAT to ip:port
  CORRAL-MARK-MASQ                         set the masquerade mark bit
  POSTROUTING -> CORRAL-PROXY-POST         marked: clear the bit and MASQUERADE
  CORRAL-PROXY-CANARY                      one rule; gone = someone flushed the table
filter table
  INPUT, FORWARD, OUTPUT (ctstate NEW)     -> CORRAL-SERVICES: REJECT for service
                                           ports without endpoints (VIP, nodePort,
                                           externalIPs): a TCP reset for TCP (ICMP errors
                                           are rate limited per client), ICMP port
                                           unreachable for UDP and SCTP; DROP where the
                                           service has endpoints but none the path's
                                           traffic policy allows (kube-proxy's answer)
  CORRAL-PROXY-CANARY

ClientIP affinity uses one ipset `hash:ip` with timeouts per (service port,
endpoint), `CORRAL-AFF-<h>` (same hash as the SEP chain): `-m set --match-set S
src` sticks, `-j SET --add-set S src --exist --timeout T` remembers and refreshes.
xt_recent's lists are capped at ip_list_tot (100 here, a fixed built-in module
parameter); a hash:ip set holds up to maxelem (65536 by default) clients and
removing an endpoint's set forgets its clients at once.

Why buckets: a flat CORRAL-SERVICES holds a rule per service port, so every
sync that adds or removes a service rewrites all of them (10k rules: ~0.6 s of
iptables-restore on nf_tables) and a packet walks them in order. With 256
buckets keyed on the VIP's last octet (a non-contiguous mask iptables and
nftables both match; it spreads sequential and random VIP allocations alike),
a partial sync rewrites only the buckets of the services that changed (a few
dozen rules at 10k services) and only when their portal lines changed; a
packet walks at most 256 + a bucket's rules.
"""

from __future__ import annotations

import base64
import hashlib
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

SERVICES = "CORRAL-SERVICES"
NODEPORTS = "CORRAL-NODEPORTS"
EXTERNALS = "CORRAL-EXTERNALS"
MARK_MASQ = "CORRAL-MARK-MASQ"
POSTROUTING = "CORRAL-PROXY-POST"
CANARY = "CORRAL-PROXY-CANARY"
SVC_PREFIX = "CORRAL-SVC-"
SVL_PREFIX = "CORRAL-SVL-"
EXT_PREFIX = "CORRAL-EXT-"
SEP_PREFIX = "CORRAL-SEP-"
BUCKET_PREFIX = "CORRAL-BUCKET-"
SET_PREFIX = "CORRAL-AFF-"
MASQ_MARK = "0x4000"

# hook chain -> the rule that jumps to ours, per table
NAT_HOOKS: dict[str, list[str]] = {
    "PREROUTING": ["-m", "comment", "--comment", "corral: service portals", "-j", SERVICES],
    "OUTPUT": ["-m", "comment", "--comment", "corral: service portals", "-j", SERVICES],
    "POSTROUTING": ["-m", "comment", "--comment", "corral: service masquerade", "-j", POSTROUTING],
}
_NEW = ["-m", "conntrack", "--ctstate", "NEW"]
_REJECTS = ["-m", "comment", "--comment", "corral: services without endpoints", "-j", SERVICES]
FILTER_HOOKS: dict[str, list[str]] = {h: _NEW + _REJECTS for h in ("INPUT", "FORWARD", "OUTPUT")}
FIXED_NAT = (SERVICES, NODEPORTS, EXTERNALS, MARK_MASQ, POSTROUTING, CANARY)
FIXED_FILTER = (SERVICES, CANARY)


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


def svc_chain(sp: ServicePort) -> str:
    return SVC_PREFIX + _hash(sp.id)


def svl_chain(sp: ServicePort) -> str:
    return SVL_PREFIX + _hash(sp.id)


def ext_chain(sp: ServicePort) -> str:
    return EXT_PREFIX + _hash(sp.id)


def sep_chain(sp: ServicePort, ep: EndpointInfo) -> str:
    return SEP_PREFIX + _hash(f"{sp.id}>{ep.ip}:{ep.port}")


def affinity_set(sp: ServicePort, ep: EndpointInfo) -> str:
    return SET_PREFIX + _hash(f"{sp.id}>{ep.ip}:{ep.port}")


def bucket_of(vip: str) -> int:
    """The VIP's dispatch bucket: its last octet."""
    return int(vip.rsplit(".", 1)[1])


def bucket_chain(bucket: int) -> str:
    return f"{BUCKET_PREFIX}{bucket:03d}"


def owned_chain(name: str) -> bool:
    """A chain this proxy makes per service or bucket (the fixed ones are listed apart)."""
    return name.startswith((SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, SEP_PREFIX, BUCKET_PREFIX))


def _q(text: str) -> str:
    return f'"{text}"'


def _proto(sp: ServicePort) -> str:
    p = sp.protocol.lower()
    return f"-p {p} -m {p}"


@dataclass
class ServiceRules:
    """The chains and sets of one service (all its ports)."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # nat chain -> its rules
    sets: dict[str, int] = field(default_factory=dict)  # affinity set -> timeout
    bucket: int | None = None  # the VIP's bucket (None: no portals)
    portals: list[str] = field(default_factory=list)  # nat CORRAL-BUCKET-<bucket> lines
    nodeports: list[str] = field(default_factory=list)  # nat CORRAL-NODEPORTS lines
    externals: list[str] = field(default_factory=list)  # nat CORRAL-EXTERNALS lines
    rejects: list[str] = field(default_factory=list)  # filter CORRAL-SERVICES lines


def probability(i: int, n: int) -> str:
    """The cascade's chance for endpoint i of n to take what endpoints 0..i-1 left."""
    return f"{1.0 / (n - i):.10f}"


def _reject(sp: ServicePort, match: str, comment: str, target: str) -> str:
    if target == "DROP":
        how = "-j DROP"
    else:  # TCP: a reset (not ICMP, which the kernel rate-limits per client)
        how = "-j REJECT --reject-with " + (
            "tcp-reset" if sp.protocol == "TCP" else "icmp-port-unreachable"
        )
    return f"-A {SERVICES} {match} -m comment --comment {_q(comment)} {how}"


def _balance(
    out: ServiceRules, sp: ServicePort, chain: str, eps: tuple[EndpointInfo, ...], dst: str,
    cluster_cidr: str,
) -> None:  # fmt: skip
    """`chain`: masquerade off-cluster clients of the VIP, affinity, the random cascade."""
    rules = [f"-A {chain} ! -s {cluster_cidr} {dst} -j {MARK_MASQ}"]
    seps = [(ep, sep_chain(sp, ep)) for ep in eps]
    if sp.affinity_timeout:
        for ep, sep in seps:
            s = affinity_set(sp, ep)
            out.sets[s] = sp.affinity_timeout
            rules.append(f"-A {chain} -m set --match-set {s} src -j {sep}")
    n = len(seps)
    for i, (ep, sep) in enumerate(seps):
        stat = (
            "" if i == n - 1 else f"-m statistic --mode random --probability {probability(i, n)} "
        )
        rules.append(f"-A {chain} {stat}-j {sep}".replace("  ", " "))
        sep_rules = [f"-A {sep} -s {ep.ip}/32 -j {MARK_MASQ}"]
        if sp.affinity_timeout:
            s = affinity_set(sp, ep)
            sep_rules.append(
                f"-A {sep} -j SET --add-set {s} src --exist --timeout {sp.affinity_timeout}"
            )
        sep_rules.append(f"-A {sep} {_proto(sp)} -j DNAT --to-destination {ep.ip}:{ep.port}")
        out.chains[sep] = sep_rules
    out.chains[chain] = rules


def service_rules(view: ServiceView, cluster_cidr: str) -> ServiceRules:
    out = ServiceRules()
    for sp in view.ports:
        all_eps = view.endpoints_of(sp)
        everywhere = usable(all_eps)  # the cluster policy's endpoints
        local = usable(tuple(e for e in all_eps if e.local))
        internal = cluster_endpoints(sp, all_eps)
        external = external_endpoints(sp, all_eps) if sp.external else ()
        comment = f"{sp.service}:{sp.name}" if sp.name else sp.service
        dst = f"-d {sp.cluster_ip}/32 {_proto(sp)} --dport {sp.port}"
        # which chains the port needs
        ext = sp.external and bool(external or (sp.external_local and everywhere))
        # SVC: the ClusterIP under Cluster, and every external path (Local sends pods
        # and the node's own processes there); SVL: whichever path is Local
        want_svc = bool(everywhere) and ((bool(internal) and not sp.internal_local) or ext)
        want_svl = bool(local) and ((internal and sp.internal_local) or (ext and sp.external_local))
        svc, svl = svc_chain(sp), svl_chain(sp)
        if want_svc:
            _balance(out, sp, svc, everywhere, dst, cluster_cidr)
        if want_svl:
            _balance(out, sp, svl, local, dst, cluster_cidr)
        # the cluster IP
        if internal:
            out.bucket = bucket_of(sp.cluster_ip)  # one VIP per service: one bucket
            out.portals.append(
                f"-A {bucket_chain(out.bucket)} {dst} -m comment "
                f"--comment {_q(comment + ' cluster IP')} -j {svl if sp.internal_local else svc}"
            )
        else:
            why = " has no endpoints" if not everywhere else " has no local endpoints"
            out.rejects.append(_reject(sp, dst, comment + why, refusal(all_eps)))
        if not sp.external:
            continue
        # external traffic: nodePort, externalIPs, LoadBalancer IPs
        if ext:
            e = ext_chain(sp)
            if sp.external_local:
                rules = [
                    f"-A {e} -s {cluster_cidr} -m comment --comment "
                    f"{_q('pods to external destinations: cluster-wide')} -j {svc}",
                    f"-A {e} -m addrtype --src-type LOCAL -j {MARK_MASQ}",
                    f"-A {e} -m addrtype --src-type LOCAL -j {svc}",
                ]
                if external:
                    rules.append(f"-A {e} -j {svl}")
            else:
                rules = [f"-A {e} -j {MARK_MASQ}", f"-A {e} -j {svc}"]
            out.chains[e] = rules
            if sp.node_port:
                out.nodeports.append(
                    f"-A {NODEPORTS} {_proto(sp)} --dport {sp.node_port} "
                    f"-m comment --comment {_q(comment)} -j {e}"
                )
            for ip in sp.external_ips:
                out.externals.append(
                    f"-A {EXTERNALS} -d {ip}/32 {_proto(sp)} --dport {sp.port} "
                    f"-m comment --comment {_q(comment + ' external IP')} -j {e}"
                )
        if not external:
            why = " has no endpoints" if not everywhere else " has no local endpoints"
            target = refusal(all_eps)
            if sp.node_port:
                out.rejects.append(
                    _reject(sp, f"-m addrtype --dst-type LOCAL {_proto(sp)} --dport "
                            f"{sp.node_port}", comment + why, target)
                )  # fmt: skip
            for ip in sp.external_ips:
                out.rejects.append(
                    _reject(sp, f"-d {ip}/32 {_proto(sp)} --dport {sp.port}", comment + why,
                            target)
                )  # fmt: skip
    return out


def fixed_nat_rules() -> dict[str, list[str]]:
    return {
        MARK_MASQ: [f"-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}"],
        POSTROUTING: [
            f"-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
            f"-A {POSTROUTING} -m comment --comment "
            f"{_q('corral: service traffic that needs SNAT')} -j MASQUERADE --random-fully",
        ],
        CANARY: [f"-A {CANARY} -j RETURN"],
    }


Chain = tuple[str, str]  # (table, chain)
NAT_SERVICES: Chain = ("nat", SERVICES)
NAT_NODEPORTS: Chain = ("nat", NODEPORTS)
NAT_EXTERNALS: Chain = ("nat", EXTERNALS)
FILTER_SERVICES: Chain = ("filter", SERVICES)


def top_rules(buckets: Iterable[int], externals: bool = False) -> list[str]:
    """nat CORRAL-SERVICES: a jump per bucket in use, to the external IPs when a service
    has some, then local destinations -> nodePorts."""
    out = [
        f"-A {SERVICES} -d 0.0.0.{b}/0.0.0.255 -j {bucket_chain(b)}" for b in sorted(set(buckets))
    ]
    if externals:
        out.append(
            f"-A {SERVICES} -m comment --comment {_q('corral: external IPs')} -j {EXTERNALS}"
        )
    out.append(
        f"-A {SERVICES} -m comment --comment {_q('corral: service nodeports')} "
        f"-m addrtype --dst-type LOCAL -j {NODEPORTS}"
    )
    return out


@dataclass
class Index:
    """Which services have which dispatch lines, so a partial sync walks only those."""

    members: dict[int, set[str]] = field(default_factory=dict)  # bucket -> keys with portals
    nodeports: set[str] = field(default_factory=set)  # keys with nodePort lines
    externals: set[str] = field(default_factory=set)  # keys with external IP lines
    rejects: set[str] = field(default_factory=set)  # keys with REJECT lines
    sets: set[str] = field(default_factory=set)  # keys with affinity sets

    def add(self, key: str, r: ServiceRules) -> None:
        if r.portals and r.bucket is not None:
            self.members.setdefault(r.bucket, set()).add(key)
        for flag, where in ((r.nodeports, self.nodeports), (r.rejects, self.rejects),
                            (r.sets, self.sets), (r.externals, self.externals)):  # fmt: skip
            if flag:
                where.add(key)

    def discard(self, key: str, r: ServiceRules) -> None:
        if r.bucket is not None and r.bucket in self.members:
            self.members[r.bucket].discard(key)
        for where in (self.nodeports, self.rejects, self.sets, self.externals):
            where.discard(key)

    @classmethod
    def of(cls, per_service: Mapping[str, ServiceRules]) -> Index:
        ix = cls()
        for k, r in per_service.items():
            ix.add(k, r)
        return ix


def dispatch_rules(
    per_service: Mapping[str, ServiceRules],
    buckets: Iterable[int] | None = None,
    index: Index | None = None,
) -> dict[Chain, list[str]]:
    """The dispatch chains' rules: every one, or with `buckets` the top chain and those.

    `index` (kept by the caller) saves walking every service; a bucket with no
    rules is in the result with an empty list: it is to be deleted.
    """
    ix = index if index is not None else Index.of(per_service)
    in_use = [b for b, ks in ix.members.items() if ks]
    out: dict[Chain, list[str]] = {NAT_SERVICES: top_rules(in_use, bool(ix.externals))}
    for b in sorted(set(in_use if buckets is None else buckets)):
        lines: list[str] = []
        for k in sorted(ix.members.get(b, ())):
            lines += per_service[k].portals
        out[("nat", bucket_chain(b))] = lines
    out[NAT_NODEPORTS] = [ln for k in sorted(ix.nodeports) for ln in per_service[k].nodeports]
    out[NAT_EXTERNALS] = [ln for k in sorted(ix.externals) for ln in per_service[k].externals]
    out[FILTER_SERVICES] = [ln for k in sorted(ix.rejects) for ln in per_service[k].rejects]
    return out


@dataclass
class Ruleset:
    """One restore's input."""

    text: str
    lines: int  # rules written


def build(
    per_service: Mapping[str, ServiceRules],
    write: Iterable[str] | None,
    dispatch: Mapping[Chain, list[str]],
    delete_chains: Iterable[str] = (),
    hooks: Mapping[tuple[str, str], bool] | None = None,
    fixed: bool = True,
) -> Ruleset:
    """restore input: the given dispatch chains and the chains of the `write` services.

    `write` None writes every service's chains (a full sync). `dispatch` maps
    (table, chain) -> rules for the dispatch chains to write; an empty bucket
    chain is deleted. `delete_chains` are other owned nat chains to remove
    (flushed, and deleted after the chains that jumped to them are rewritten).
    `hooks` maps (table, hook) -> present; missing ones are inserted first in
    their hook chain. `fixed` rewrites the fixed chains (and the canaries).
    """
    writing = sorted(per_service) if write is None else sorted(set(write) & set(per_service))
    empty_buckets = {c for (t, c), rules in dispatch.items() if not rules and owned_chain(c)}
    nat_chains = {c: rules for (t, c), rules in dispatch.items() if t == "nat"}
    if fixed:
        nat_chains.update(fixed_nat_rules())
    delete = sorted(set(delete_chains) | empty_buckets)
    body: list[str] = []
    declared: set[str] = set()
    # dispatch chains first: the top chain, then buckets, nodePorts, the fixed ones
    for c, rules in nat_chains.items():
        if c in empty_buckets:
            continue
        declared.add(c)
        body += rules
    for k in writing:
        for chain, rules in per_service[k].chains.items():
            declared.add(chain)
            body += rules
    nat: list[str] = []
    if declared or delete or hooks:
        # Declarations in name order: iptables-nft keeps user chains sorted by name and
        # inserts each with a list walk, so hashed names in random order make a large
        # restore quadratic (bench.proxy: ~3x faster at 3k services, more at 10k).
        nat = ["*nat", *(f":{c} - [0:0]" for c in sorted(declared | set(delete)))]
        if hooks:
            for hook, rule in NAT_HOOKS.items():
                if not hooks.get(("nat", hook), False):
                    nat.append(f"-I {hook} 1 " + " ".join(_quote(rule)))
        nat += body
        nat += [f"-X {c}" for c in delete]
        nat.append("COMMIT")
    flt: list[str] = []
    rejects = dispatch.get(FILTER_SERVICES)
    if rejects is not None or fixed or hooks:
        flt = ["*filter"]
        if rejects is not None:
            flt.append(f":{SERVICES} - [0:0]")
        if fixed:
            flt.append(f":{CANARY} - [0:0]")
        if hooks:
            for hook, rule in FILTER_HOOKS.items():
                if not hooks.get(("filter", hook), False):
                    flt.append(f"-I {hook} 1 " + " ".join(_quote(rule)))
        flt += rejects or []
        if fixed:
            flt.append(f"-A {CANARY} -j RETURN")
        flt.append("COMMIT")
    lines = sum(1 for ln in nat + flt if ln.startswith(("-A", "-I")))
    text = "\n".join(nat + flt) + "\n" if nat or flt else ""
    return Ruleset(text, lines)


def _quote(args: list[str]) -> list[str]:
    return [f'"{a}"' if " " in a else a for a in args]


def cleanup_text(chains_by_table: Mapping[str, Iterable[str]]) -> str:
    """restore input that flushes and deletes the given chains (hooks already removed)."""
    out: list[str] = []
    for table, chains in chains_by_table.items():
        cs = sorted(set(chains))
        if not cs:
            continue
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in cs]
        out += [f"-X {c}" for c in cs]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""
