"""Masquerade for pod traffic that leaves the cluster network, and nothing else.

corral owns one nat chain, CORRAL-POSTROUTING, jumped to from POSTROUTING,
rewritten whole through `corral.node.iptables` so rules of other programs are
never touched. Pod-to-pod traffic inside the cluster network RETURNs first: a
server in a pod sees the client pod's own address.
"""

from __future__ import annotations

from corral.node import iptables

CHAIN = "CORRAL-POSTROUTING"
JUMP = ["-m", "comment", "--comment", "corral: pod masquerade", "-j", CHAIN]


def rules(network: str) -> list[str]:
    """The chain's rules, in `iptables -S` spelling."""
    return [
        f"-A {CHAIN} -s {network} -d {network} -m comment --comment "
        '"corral: pod to pod, no NAT" -j RETURN',
        f"-A {CHAIN} -s {network} ! -d 224.0.0.0/4 -m comment --comment "
        '"corral: pod to outside the cluster" -j MASQUERADE --random-fully',
    ]


def ensure(namespace: str | None, network: str, enabled: bool) -> bool:
    """Make the masquerade rules match `enabled`; True if anything changed."""
    jumps = {"POSTROUTING": JUMP}
    if enabled:
        return iptables.ensure_chain(namespace, "nat", CHAIN, rules(network), jumps)
    return iptables.remove_chain(namespace, "nat", CHAIN, jumps)
