"""Keep VXLAN's outer UDP packets out of connection tracking in the node namespace.

Every encapsulated packet would otherwise get a conntrack lookup on the way
out (OUTPUT) and on the way in (PREROUTING), on top of the lookups the inner
packet gets anyway. Nothing needs state for the outer packets: they are never
NATed, and the inner packets (which services' DNAT does need) stay tracked.
Measured with `bench.overlay`: about +0.05 on the pod/node throughput ratio.

corral owns one raw-table chain, CORRAL-VXLAN, jumped to from PREROUTING and
OUTPUT, written through `corral.node.iptables` like the masquerade chain.
"""

from __future__ import annotations

from corral.node import iptables

CHAIN = "CORRAL-VXLAN"
HOOKS = ("PREROUTING", "OUTPUT")
JUMP = ["-m", "comment", "--comment", "corral: VXLAN outer packets", "-j", CHAIN]


def rules(port: int) -> list[str]:
    """The chain's rules, in `iptables -S` spelling."""
    return [
        f"-A {CHAIN} -p udp -m udp --dport {port} -m comment --comment "
        '"corral: VXLAN packets skip conntrack" -j CT --notrack'
    ]


def ensure(namespace: str | None, port: int) -> bool:
    """Make the chain match the VXLAN `port` and hook it in; True if anything changed."""
    return iptables.ensure_chain(namespace, "raw", CHAIN, rules(port), dict.fromkeys(HOOKS, JUMP))
