"""What the overlay lets in: VXLAN only from the nodes holding leases, and none from pods.

Kernel path: corral owns one raw-table chain in the node namespace,
`CORRAL-VXLAN-GUARD`, jumped to from raw `PREROUTING` (before routing and
conntrack, so it sees what comes for the node and what the node would forward
alike):

    -A CORRAL-VXLAN-GUARD -s <network> -p udp --dport <port> -j DROP   # from pods
    -A CORRAL-VXLAN-GUARD -s <peer>/32 -p udp --dport <port> -j RETURN # one per peer
    -A CORRAL-VXLAN-GUARD -p udp --dport <port> -j DROP                # from anyone else

The first rule is what keeps a pod from reaching any node's VXLAN socket
(its own node's, or another's after masquerade made the packet look like
node traffic): it drops pod packets to the VXLAN port wherever they go. A
packet DNATed to the VXLAN port later (a service whose endpoint is a node's
VXLAN socket) is caught after the DNAT by a filter chain, `CORRAL-VXLAN-PODS`,
jumped to from `INPUT` and `FORWARD`:

    -A CORRAL-VXLAN-PODS -s <network> -p udp --dport <port> -j DROP The
peers are the public IPs of every other lease in the network (direct-routed
ones included: a peer may still encapsulate while a config change reaches it),
the same set the agent programs FDB entries from. A peer change adds or
deletes just that peer's RETURN rule (`iptables-restore --noflush` without
declaring the chain), so the drop counters survive it; the chain is rewritten
whole only when the network or port changes.

The eBPF fast path makes the same checks before netfilter (`from_pod` drops
pod packets to the port, `from_uplink` VXLAN from addresses not in its
`peer_ips` map); whatever it leaves to the kernel meets these rules.

`drops()` adds up both datapaths' counters and the pod guard's
(corral.node.podguard) for `datapath.json`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from corral.node import iptables, podguard

TABLE = "raw"
CHAIN = "CORRAL-VXLAN-GUARD"
HOOK = "PREROUTING"
JUMP = ["-m", "comment", "--comment", "corral: VXLAN only from peers", "-j", CHAIN]
FROM_PODS = "corral: pods may not send to the VXLAN port"
FOREIGN = "corral: VXLAN from an address that is not a peer"

DROPS = ("spoofed", "vxlan_from_pods", "vxlan_foreign", "not_ipv4")
FILTER_CHAIN = "CORRAL-VXLAN-PODS"
FILTER_HOOKS = ("INPUT", "FORWARD")
FILTER_JUMP = ["-m", "comment", "--comment", "corral: pods may not send VXLAN", "-j", FILTER_CHAIN]
_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")


def _udp(port: int) -> str:
    return f"-p udp -m udp --dport {port}"


def pods_rule(network: str, port: int) -> str:
    return f'-A {CHAIN} -s {network} {_udp(port)} -m comment --comment "{FROM_PODS}" -j DROP'


def peer_rule(ip: str, port: int) -> str:
    return f"-A {CHAIN} -s {ip}/32 {_udp(port)} -j RETURN"


def foreign_rule(port: int) -> str:
    return f'-A {CHAIN} {_udp(port)} -m comment --comment "{FOREIGN}" -j DROP'


def peer_ips(remotes: Iterable[Any]) -> set[str]:
    """The underlay addresses VXLAN may come from: every other lease's public IP."""
    return {r.public_ip for r in remotes}


def filter_rule(network: str, port: int) -> str:
    return f'-A {FILTER_CHAIN} -s {network} {_udp(port)} -m comment --comment "{FROM_PODS}" -j DROP'


def ensure(namespace: str | None, network: str, port: int, peers: set[str]) -> list[str]:
    """Make the chains accept VXLAN from exactly `peers`, none from pods; what changed."""
    changes = []
    if iptables.ensure_chain(
        namespace,
        "filter",
        FILTER_CHAIN,
        [filter_rule(network, port)],
        dict.fromkeys(FILTER_HOOKS, FILTER_JUMP),
    ):
        changes.append(f"pods may not send to UDP {port}, DNATed or not (filter INPUT, FORWARD)")
    return changes + _ensure_raw(namespace, network, port, peers)


def _ensure_raw(namespace: str | None, network: str, port: int, peers: set[str]) -> list[str]:
    have = iptables.chain_rules(namespace, TABLE, CHAIN)
    jump_missing = not iptables.has_rule(namespace, TABLE, HOOK, JUMP)
    first, last = pods_rule(network, port), foreign_rule(port)
    want_peers = {peer_rule(ip, port): ip for ip in sorted(peers)}
    if have is None or len(have) < 2 or have[0] != first or have[-1] != last:
        rules = [first, *want_peers, last]
        iptables.ensure_chain(namespace, TABLE, CHAIN, rules, {HOOK: JUMP})
        return [f"VXLAN accepted only from {len(peers)} peer(s); pods may not send to UDP {port}"]
    middle = set(have[1:-1])
    lines: list[str] = []
    changes: list[str] = []
    for rule in sorted(middle - set(want_peers)):
        lines.append(rule.replace(f"-A {CHAIN} ", f"-D {CHAIN} ", 1))
        changes.append(f"VXLAN guard: {rule.split()[3]} no longer a peer")
    for rule, ip in want_peers.items():
        if rule not in middle:
            lines.append(rule.replace(f"-A {CHAIN} ", f"-I {CHAIN} 2 ", 1))
            changes.append(f"VXLAN guard: VXLAN from peer {ip} accepted")
    if jump_missing:
        lines.append(f"-I {HOOK} 1 {iptables.quote(JUMP)}")
        changes.append(f"VXLAN guard: jump from raw {HOOK} restored")
    if lines:
        iptables.restore(namespace, "\n".join([f"*{TABLE}", *lines, "COMMIT"]) + "\n")
    return changes


def kernel_drops(namespace: str | None) -> dict[str, int]:
    """Packets the chain dropped: from pods, and from addresses that are no peer's."""
    out = {"vxlan_from_pods": 0, "vxlan_foreign": 0}
    save = ""
    for table in (TABLE, "filter"):
        save += iptables.run(namespace, ["iptables-save", "-c", "-t", table], check=False).stdout
    for line in save.splitlines():
        m = _COUNTED.match(line)
        if m is None or m[3] not in (CHAIN, FILTER_CHAIN):
            continue
        if FROM_PODS in m[4]:
            out["vxlan_from_pods"] += int(m[1])
        elif FOREIGN in m[4]:
            out["vxlan_foreign"] += int(m[1])
    return out


def drops(namespace: str | None, fastpath: Any = None) -> dict[str, Any]:
    """What `datapath.json` shows under "dropped": totals, and by datapath."""
    doc: dict[str, Any] = {}
    kernel: dict[str, int] = {}
    try:
        kernel = {**podguard.counters(namespace), **kernel_drops(namespace)}
    except (podguard.GuardError, iptables.IptablesError, OSError) as e:
        doc["error"] = f"cannot read the kernel's counters: {e}"
    bpf: dict[str, int] = fastpath.drops() if fastpath is not None else {}
    doc.update({k: kernel.get(k, 0) + bpf.get(k, 0) for k in DROPS}, kernel=kernel)
    if fastpath is not None:
        doc["bpf"] = bpf
    return doc
