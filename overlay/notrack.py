"""Keep VXLAN's outer UDP packets out of connection tracking in the node namespace.

Every encapsulated packet would otherwise get a conntrack lookup on the way
out (OUTPUT) and on the way in (PREROUTING), on top of the lookups the inner
packet gets anyway. Nothing needs state for the outer packets: they are never
NATed, and the inner packets (which services' DNAT does need) stay tracked.
Measured with `bench.overlay`: about +0.05 on the pod/node throughput ratio.

corral owns one raw-table chain, CORRAL-VXLAN, jumped to from PREROUTING and
OUTPUT, and rewrites it whole with `iptables-restore --noflush` like the
masquerade chain, so other programs' rules are never touched.
"""

from __future__ import annotations

from corral.overlay.masq import run_iptables

CHAIN = "CORRAL-VXLAN"
HOOKS = ("PREROUTING", "OUTPUT")
JUMP = ["-m", "comment", "--comment", "corral: VXLAN outer packets", "-j", CHAIN]


def rules(port: int) -> list[str]:
    """The chain's rules, in `iptables -S` spelling."""
    return [
        f"-A {CHAIN} -p udp -m udp --dport {port} -m comment --comment "
        '"corral: VXLAN packets skip conntrack" -j CT --notrack'
    ]


def current(namespace: str | None) -> tuple[list[str] | None, dict[str, bool]]:
    """(rules in corral's chain or None if there is none, which hooks jump to it)."""
    p = run_iptables(namespace, ["iptables", "-t", "raw", "-S", CHAIN], check=False)
    chain = (
        None
        if p.returncode != 0
        else [ln for ln in p.stdout.splitlines() if ln.startswith(f"-A {CHAIN} ")]
    )
    jumps = {
        h: run_iptables(
            namespace, ["iptables", "-t", "raw", "-C", h, *JUMP], check=False
        ).returncode
        == 0
        for h in HOOKS
    }
    return chain, jumps


def ensure(namespace: str | None, port: int) -> bool:
    """Make the chain match the VXLAN `port` and hook it in; True if anything changed."""
    chain, jumps = current(namespace)
    want = rules(port)
    if chain == want and all(jumps.values()):
        return False
    lines = ["*raw", f":{CHAIN} - [0:0]", *want]
    jump = " ".join(f'"{a}"' if " " in a else a for a in JUMP)
    lines += [f"-I {h} 1 {jump}" for h, ok in jumps.items() if not ok]
    lines.append("COMMIT")
    run_iptables(namespace, ["iptables-restore", "--noflush"], stdin="\n".join(lines) + "\n")
    return True
