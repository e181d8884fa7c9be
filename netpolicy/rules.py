"""NetworkPolicy as iptables rules in a node's namespace (filter table).

Every packet a node forwards passes `FORWARD`, routed or bridged
(`net.bridge.bridge-nf-call-iptables=1`), after the service proxy's DNAT, so
a Service VIP flow is judged on its backend pod. corral owns:

    -I FORWARD 1 -j CORRAL-NETPOL
    CORRAL-NETPOL
      -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN     replies, always
      -s <pod IP>/32 -j CORRAL-NPE-<pod IP>    a local pod isolated for egress
      -d <pod IP>/32 -j CORRAL-NPI-<pod IP>    a local pod isolated for ingress
    CORRAL-NPI-<pod IP>  (and CORRAL-NPE-<pod IP> with -d for -s)
      -s <peer CIDR> -p tcp -m tcp --dport 80 -m comment --comment "x/web:ingress:0" -j RETURN
      ...
      -m comment --comment "deny:ingress:x/web,x/deny-all" -j DROP

A chain RETURNs what a rule allows (the comment names policy, direction and
rule index; its counter is the policy's allow counter) and DROPs the rest (the
default deny of the policies named). An egress RETURN goes on to the
destination's ingress check in CORRAL-NETPOL, so a flow between two local pods
meets both. Only local pods have chains: a remote pod's egress was judged on
its own node, a remote destination's ingress is judged on its node. Traffic
from the node itself to its pods passes OUTPUT, never FORWARD, so it is never
judged (Kubernetes: probes from the node are allowed).

Rules are spelled as `iptables-save` prints them, so the state read back
compares equal: a chain is rewritten only when it differs (the others keep
their counters), which is also how drift is repaired.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

from corral.netpolicy import droplog
from corral.netpolicy.model import EGRESS, INGRESS, Allow, PodPolicy, PortRange
from corral.node import iptables

TABLE = "filter"
CHAIN = "CORRAL-NETPOL"
HOOK = "FORWARD"
JUMP = f"-j {CHAIN}"
PREFIX = {INGRESS: "CORRAL-NPI-", EGRESS: "CORRAL-NPE-"}
ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"

_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")
_COMMENT = re.compile(r'-m comment --comment "([^"]*)"')


def owned(chain: str) -> bool:
    return chain == CHAIN or any(chain.startswith(p) for p in PREFIX.values())


def chain_of(direction: str, ip: str) -> str:
    return PREFIX[direction] + ip


def _port_match(p: PortRange) -> str:
    proto = p.protocol.lower()
    if p.lo is None:
        return f"-p {proto}"
    ports = str(p.lo) if p.hi == p.lo else f"{p.lo}:{p.hi}"
    return f"-p {proto} -m {proto} --dport {ports}"


def allow_rules(direction: str, a: Allow) -> list[str]:
    """One allow entry as rules: peer CIDRs x port ranges."""
    flag = "-s" if direction == INGRESS else "-d"
    comment = f'-m comment --comment "{a.policy}:{direction.lower()}:{a.rule}"'
    if a.peers is None:
        peers = [""]
    else:  # pods and this table are IPv4: an IPv6 ipBlock can match nothing here
        peers = [f"{flag} {c if '/' in c else c + '/32'}" for c in a.peers if ":" not in c]
        if not peers:
            return []
    ports = [_port_match(p) for p in a.ports] if a.ports is not None else [""]
    out = []
    for peer in peers:
        for port in ports:
            out.append(" ".join(x for x in (peer, port, comment, "-j RETURN") if x))
    return out


def pod_chain(direction: str, pp: PodPolicy, log: bool = False) -> list[str]:
    """A pod's chain: its allow rules, then (`log`: an NFLOG line per dropped flow,
    netpolicy/droplog.py) the default deny."""
    d = pp.direction(direction)
    out: list[str] = []
    for a in d.allows or []:
        for r in allow_rules(direction, a):
            if r not in out:
                out.append(r)
    if log:
        out.append(droplog.log_rule(direction[0], pp.pod.ip))
    deny = f"deny:{direction.lower()}:{','.join(d.policies)}"[:250]
    return [*out, f'-m comment --comment "{deny}" -j DROP']


@dataclass
class Wanted:
    """corral's chains as they should be: chain -> rules (iptables-save spelling)."""

    chains: dict[str, list[str]] = field(default_factory=dict)


def render(local: list[PodPolicy], logged: Collection[str] = ()) -> Wanted:
    """The chains for this node's pods (their effective policies); pods of the
    namespaces in `logged` log their dropped flows."""
    w = Wanted()
    dispatch = [ESTABLISHED]
    for pp in sorted(local, key=lambda p: p.pod.ip):
        if pp.egress.isolated:
            c = chain_of(EGRESS, pp.pod.ip)
            dispatch.append(f"-s {pp.pod.ip}/32 -j {c}")
            w.chains[c] = pod_chain(EGRESS, pp, pp.pod.namespace in logged)
    for pp in sorted(local, key=lambda p: p.pod.ip):
        if pp.ingress.isolated:
            c = chain_of(INGRESS, pp.pod.ip)
            dispatch.append(f"-d {pp.pod.ip}/32 -j {c}")
            w.chains[c] = pod_chain(INGRESS, pp, pp.pod.namespace in logged)
    w.chains[CHAIN] = dispatch
    return w


@dataclass
class Saved:
    """The filter table as `iptables-save -c` shows it (corral's chains and the hook)."""

    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)
    counted: list[tuple[str, str, int, int]] = field(
        default_factory=list
    )  # chain, rule, pkts, bytes


def parse(text: str) -> Saved:
    s = Saved()
    in_filter = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_filter = line == f"*{TABLE}"
        elif not in_filter:
            continue
        elif line.startswith(":"):
            s.chains.add(line[1:].split()[0])
        elif m := _COUNTED.match(line):
            chain, rule = m[3], m[4]
            if chain == HOOK or owned(chain):
                s.rules.setdefault(chain, []).append(rule)
                s.counted.append((chain, rule, int(m[1]), int(m[2])))
    return s


def read(namespace: str | None) -> Saved:
    return parse(iptables.run(namespace, ["iptables-save", "-c", "-t", TABLE]).stdout)


def diff(have: Saved, want: Wanted) -> tuple[list[str], list[str]]:
    """(restore lines, chains rewritten or removed) that make `have` into `want`."""
    lines: list[str] = []
    touched: list[str] = []
    for chain, rules in want.chains.items():
        if chain not in have.chains or have.rules.get(chain, []) != rules:
            lines.append(f":{chain} - [0:0]")  # declared: flushed, then rewritten
            lines += [f"-A {chain} {r}" for r in rules]
            touched.append(chain)
    hook = have.rules.get(HOOK, [])
    if not hook or hook[0] != JUMP:
        lines += [f"-D {HOOK} {JUMP}"] * hook.count(JUMP)
        lines.append(f"-I {HOOK} 1 {JUMP}")
    gone = sorted(c for c in have.chains if owned(c) and c not in want.chains)
    if gone:
        # the dispatch chain is rewritten first (above) so nothing jumps to them any more
        lines += [f"-F {c}" for c in gone] + [f"-X {c}" for c in gone]
        touched += gone
    return lines, touched


def apply(namespace: str | None, lines: list[str]) -> None:
    if lines:
        iptables.restore(namespace, "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n")


def remove(namespace: str | None) -> bool:
    """Take every corral NetworkPolicy chain out (tests, a node leaving)."""
    have = read(namespace)
    lines = [f"-D {HOOK} {JUMP}"] * have.rules.get(HOOK, []).count(JUMP)
    chains = sorted(c for c in have.chains if owned(c))
    lines += [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains]
    apply(namespace, lines)
    return bool(lines)


def counts(saved: Saved) -> dict[tuple[str, str, str], int]:
    """(policy, direction, verdict) -> packets, from the rules' counters.

    An allow rule counts for its policy; a default-deny DROP counts for every
    policy isolating that pod in that direction (each of them denies it).
    """
    out: dict[tuple[str, str, str], int] = {}
    for chain, rule, pkts, _ in saved.counted:
        if chain in (CHAIN, HOOK) or not (m := _COMMENT.search(rule)):
            continue
        text = m[1]
        if text.startswith("deny:"):
            _, direction, pols = text.split(":", 2)
            for pol in filter(None, pols.split(",")):
                k = (pol, direction, "deny")
                out[k] = out.get(k, 0) + pkts
        else:
            pol, direction, _ = text.rsplit(":", 2)
            k = (pol, direction, "allow")
            out[k] = out.get(k, 0) + pkts
    return out
