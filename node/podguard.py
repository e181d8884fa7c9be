"""Anti-spoofing on pod veths for the kernel's path: a pod sends only from its own IP and MAC.

The kernel's tc here has no generic actions (no gact, flower or matchall), so
the kernel path's guard is the bridge's netfilter: corral owns one ebtables
chain in the node namespace's `nat` table, `CORRAL-PODS`, jumped to first from
`PREROUTING` (every frame a pod sends enters `cni0` there, before the bridge
switches it to another pod or hands it to the node to route), and one chain per
pod veth, `CORRAL-P-<host veth>`:

    -A CORRAL-PODS -i <veth> -j CORRAL-P-<veth>
    -A CORRAL-P-<veth> -p IPv4 -s <pod MAC> --ip-src <pod IP> -j RETURN
    -A CORRAL-P-<veth> -p ARP -s <pod MAC> --arp-ip-src <pod IP> --arp-mac-src <pod MAC> -j RETURN
    -A CORRAL-P-<veth> -p IPv4 -j DROP          # spoofed IPv4 source or MAC
    -A CORRAL-P-<veth> -p ARP -j DROP           # spoofed ARP sender
    -A CORRAL-P-<veth> -j DROP                  # neither IPv4 nor ARP (IPv6 included)

What a veth may send from comes from its alias (`corral.node.podveth`), so the
guard is kernel state reconciled from the kernel itself: the overlay agent
re-applies it on pod link events and every periodic pass (a flushed chain comes
back), and it goes with the pod (the DEL's veth leaves; the next pass removes
its chain). Rules are added and removed one pod at a time
(`ebtables-restore --noflush`, declaring only a new or changed pod's chain), so
the drop counters of the other pods are kept. The eBPF fast path applies the
same checks in `from_pod` (ebpf/overlay_fastpath.c) before the bridge; what it
leaves to the kernel then meets these rules too.

An extra source prefix (the opt-in in the alias's third field) adds one more
RETURN rule for IPv4 and one for ARP.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from corral.node import netns
from corral.node.podveth import parse_pod_alias, pod_extra_source

TABLE = "nat"
CHAIN = "CORRAL-PODS"
POD_CHAIN_PREFIX = "CORRAL-P-"
HOOK = "PREROUTING"
IFF_UP = 1

_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")


class GuardError(RuntimeError):
    pass


@dataclass(frozen=True)
class PodSource:
    """What the pod behind host veth `ifname` may send from."""

    ifname: str
    ip: str
    mac: str
    extra: str | None = None  # an opt-in extra IPv4 source prefix

    @property
    def chain(self) -> str:
        return POD_CHAIN_PREFIX + self.ifname


def pod_rules(p: PodSource) -> list[str]:
    """The pod chain's rules, spelled as `ebtables-save` prints them."""
    mac = p.mac.lower()
    sources = [p.ip]
    if p.extra:
        net = ipaddress.IPv4Network(p.extra)
        sources.append(str(net.network_address) if net.prefixlen == 32 else str(net))
    out = []
    for src in sources:
        out.append(f"-p IPv4 -s {mac} --ip-src {src} -j RETURN")
        out.append(f"-p ARP -s {mac} --arp-ip-src {src} --arp-mac-src {mac} -j RETURN")
    return [*out, "-p IPv4 -j DROP", "-p ARP -j DROP", "-j DROP"]


def dispatch_rule(p: PodSource) -> str:
    return f"-i {p.ifname} -j {p.chain}"


def pods_from_links(links: Sequence[Any]) -> dict[str, PodSource]:
    """Every up pod veth among `links` (pyroute2 link messages), by host veth name."""
    out = {}
    for link in links:
        alias = link.get_attr("IFLA_IFALIAS")
        tag = parse_pod_alias(alias)
        if tag is None or not link["flags"] & IFF_UP:
            continue
        name = str(link.get_attr("IFLA_IFNAME"))
        out[name] = PodSource(name, tag[0], tag[1], pod_extra_source(alias))
    return out


@functools.cache
def _tool(name: str) -> str:
    """`ebtables-nft-<x>` when installed (Debian's iptables package ships it), else `ebtables-<x>`.

    The nf_tables variant is the one this kernel has (no legacy ebtables).
    """
    nft = name.replace("ebtables", "ebtables-nft", 1)
    return nft if shutil.which(nft) else name


def _run(namespace: str | None, argv: list[str], stdin: str | None = None) -> str:
    argv = [_tool(argv[0]), *argv[1:]]
    full = netns.command(namespace, argv) if namespace else argv
    p = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if p.returncode != 0:
        raise GuardError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return p.stdout


def _restore(namespace: str | None, lines: list[str]) -> None:
    """One ebtables-restore transaction on corral's chains (other chains untouched)."""
    text = "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n"
    _run(namespace, ["ebtables-restore", "--noflush"], text)


@dataclass
class Saved:
    """corral's part of the nat table as `ebtables-save -c` shows it."""

    chains: set[str]
    rules: dict[str, list[str]]  # chain -> rules (without counters)
    counted: list[tuple[str, str, int]]  # (chain, rule, packets)


def read(namespace: str | None) -> Saved:
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    counted: list[tuple[str, str, int]] = []
    for line in _run(namespace, ["ebtables-save", "-c", "-t", TABLE]).splitlines():
        if line.startswith(":"):
            chains.add(line[1:].split()[0])
        elif m := _COUNTED.match(line):
            rules.setdefault(m[3], []).append(m[4])
            counted.append((m[3], m[4], int(m[1])))
    return Saved(chains, rules, counted)


def sync(namespace: str | None, pods: dict[str, PodSource], have: Saved | None = None) -> list[str]:
    """Make the guard chains match `pods` exactly; what changed, for the log.

    `have`: the rules as read *before* the links `pods` came from, so a pod that
    CNI ADD guarded in between is never taken for a gone one.
    """
    have = have or read(namespace)
    lines: list[str] = []
    changes: list[str] = []
    if CHAIN not in have.chains:
        lines.append(f":{CHAIN} RETURN")
    if f"-j {CHAIN}" not in have.rules.get(HOOK, []):
        lines.append(f"-I {HOOK} 1 -j {CHAIN}")
    present = have.rules.get(CHAIN, []) if CHAIN in have.chains else []
    dispatch = set(present)
    for rule in dispatch:  # a repeated ADD's second dispatch rule
        lines += [f"-D {CHAIN} {rule}"] * (present.count(rule) - 1)
    for p in pods.values():
        want = pod_rules(p)
        if p.chain not in have.chains or have.rules.get(p.chain, []) != want:
            lines.append(f":{p.chain} RETURN")  # declared: flushed and rewritten
            lines += [f"-A {p.chain} {r}" for r in want]
            changes.append(
                f"pod guard: {p.ifname} may send only from {p.ip} {p.mac}"
                + (f" and {p.extra}" if p.extra else "")
            )
        if dispatch_rule(p) not in dispatch:
            lines.append(f"-A {CHAIN} {dispatch_rule(p)}")
    wanted = {dispatch_rule(p) for p in pods.values()}
    for rule in sorted(dispatch - wanted):
        lines.append(f"-D {CHAIN} {rule}")
    for chain in sorted(have.chains):
        if chain.startswith(POD_CHAIN_PREFIX) and chain[len(POD_CHAIN_PREFIX) :] not in pods:
            lines += [f"-F {chain}", f"-X {chain}"]
            changes.append(f"pod guard: {chain[len(POD_CHAIN_PREFIX) :]} gone, its chain removed")
    if not lines:
        return []
    _restore(namespace, lines)
    return changes or [f"pod guard: {CHAIN} repaired"]


def add(namespace: str | None, p: PodSource) -> None:
    """Guard one new pod veth now (CNI ADD): one transaction, no read first.

    The chain is declared (flushed, rewritten) and dispatched to; should the
    base chain not exist yet, it is made too. sync() later drops a duplicate
    dispatch rule a repeated ADD may leave.
    """
    lines = [f":{p.chain} RETURN", *(f"-A {p.chain} {r}" for r in pod_rules(p))]
    lines.append(f"-A {CHAIN} {dispatch_rule(p)}")
    try:
        _restore(namespace, lines)
    except GuardError:
        if CHAIN in read(namespace).chains:
            raise
        _restore(namespace, [f":{CHAIN} RETURN", f"-I {HOOK} 1 -j {CHAIN}", *lines])


def forget(namespace: str | None, ifname: str) -> bool:
    """Remove one gone veth's chain and dispatch rule (CNI DEL); False if they were not there."""
    chain = POD_CHAIN_PREFIX + ifname
    lines = [f"-D {CHAIN} -i {ifname} -j {chain}", f"-F {chain}", f"-X {chain}"]
    try:
        _restore(namespace, lines)
    except GuardError:
        return False
    return True


def counters(namespace: str | None, saved: Saved | None = None) -> dict[str, int]:
    """Frames the guard dropped, for the pods there are now (a pod's go with its chain)."""
    saved = saved or read(namespace)
    out = {"spoofed": 0, "not_ipv4": 0}
    for chain, rule, packets in saved.counted:
        if not chain.startswith(POD_CHAIN_PREFIX):
            continue
        if rule in ("-p IPv4 -j DROP", "-p ARP -j DROP"):
            out["spoofed"] += packets
        elif rule == "-j DROP":
            out["not_ipv4"] += packets
    return out


def remove(namespace: str | None) -> bool:
    """Take the whole guard out (tests, a machine leaving the cluster)."""
    have = read(namespace)
    lines = [f"-D {HOOK} -j {CHAIN}"] if f"-j {CHAIN}" in have.rules.get(HOOK, []) else []
    for chain in sorted(have.chains):
        if chain == CHAIN or chain.startswith(POD_CHAIN_PREFIX):
            lines.append(f"-F {chain}")
    for chain in sorted(have.chains):
        if chain == CHAIN or chain.startswith(POD_CHAIN_PREFIX):
            lines.append(f"-X {chain}")
    if not lines:
        return False
    _restore(namespace, lines)
    return True
