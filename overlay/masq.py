"""Masquerade for pod traffic that leaves the cluster network, and nothing else.

corral owns one nat chain, CORRAL-POSTROUTING, jumped to from POSTROUTING.
It is rewritten whole with one `iptables-restore --noflush` (declaring a chain
in restore input flushes just that chain), so rules of other programs are
never touched. Pod-to-pod traffic inside the cluster network RETURNs first:
a server in a pod sees the client pod's own address.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from corral.cluster import netns

CHAIN = "CORRAL-POSTROUTING"
JUMP = ["-m", "comment", "--comment", "corral: pod masquerade", "-j", CHAIN]


class MasqError(RuntimeError):
    pass


def _cmd(namespace: str | None, argv: Sequence[str]) -> list[str]:
    return netns.command(namespace, argv) if namespace else list(argv)


def run_iptables(
    namespace: str | None, argv: Sequence[str], stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        _cmd(namespace, argv), input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if check and p.returncode != 0:
        raise MasqError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return p


def rules(network: str) -> list[str]:
    """The chain's rules, in `iptables -S` spelling."""
    return [
        f"-A {CHAIN} -s {network} -d {network} -m comment --comment "
        '"corral: pod to pod, no NAT" -j RETURN',
        f"-A {CHAIN} -s {network} ! -d 224.0.0.0/4 -m comment --comment "
        '"corral: pod to outside the cluster" -j MASQUERADE --random-fully',
    ]


def current(namespace: str | None) -> tuple[list[str] | None, bool]:
    """(rules in corral's chain or None if there is no chain, whether POSTROUTING jumps to it)."""
    p = run_iptables(namespace, ["iptables", "-t", "nat", "-S", CHAIN], check=False)
    chain = (
        None
        if p.returncode != 0
        else [ln for ln in p.stdout.splitlines() if ln.startswith(f"-A {CHAIN} ")]
    )
    jump = (
        run_iptables(
            namespace, ["iptables", "-t", "nat", "-C", "POSTROUTING", *JUMP], check=False
        ).returncode
        == 0
    )
    return chain, jump


def ensure(namespace: str | None, network: str, enabled: bool) -> bool:
    """Make the masquerade rules match `enabled`; True if anything changed."""
    chain, jump = current(namespace)
    want = rules(network) if enabled else []
    if chain == want and jump == enabled:
        return False
    lines = ["*nat", f":{CHAIN} - [0:0]", *want]
    if enabled and not jump:
        lines.append("-I POSTROUTING 1 " + " ".join(f'"{a}"' if " " in a else a for a in JUMP))
    lines.append("COMMIT")
    run_iptables(namespace, ["iptables-restore", "--noflush"], stdin="\n".join(lines) + "\n")
    if not enabled and jump:
        run_iptables(namespace, ["iptables", "-t", "nat", "-D", "POSTROUTING", *JUMP], check=False)
    return True
