"""iptables in a node's namespace: the one path for every chain corral owns.

Every corral chain (masquerade, VXLAN notrack, the service proxy's) is written
with `iptables-restore --noflush`: declaring a chain in restore input flushes
just that chain, so rules of other programs are never touched, and one restore
is one atomic commit. The host's own `iptables` binaries are used, so the nft
and legacy backends both work (python-iptables binds the legacy tables only).
Every call waits for the xtables lock (`-w`) instead of failing when another
program holds it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from corral.node import netns

LOCK_WAIT = "5"  # seconds to wait for the xtables lock


class IptablesError(RuntimeError):
    pass


def _argv(namespace: str | None, argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    if argv and argv[0] in ("iptables", "iptables-restore", "iptables-save") and "-w" not in argv:
        argv[1:1] = ["-w", LOCK_WAIT] if argv[0] != "iptables-save" else []
    return netns.command(namespace, argv) if namespace else argv


def run(
    namespace: str | None,
    argv: Sequence[str],
    stdin: str | None = None,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """Run an iptables command in `namespace` (None: this one), text in and out."""
    p = subprocess.run(
        _argv(namespace, argv),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and p.returncode != 0:
        raise IptablesError(f"{' '.join(argv)} failed: {p.stderr.strip()}")
    return p


def quote(args: Sequence[str]) -> str:
    """Arguments as one restore-file line (quoting those with spaces)."""
    return " ".join(f'"{a}"' if " " in a else a for a in args)


def restore(namespace: str | None, text: str, timeout: float = 60) -> None:
    """Apply restore input (`*table ... COMMIT` blocks) without flushing other chains."""
    run(namespace, ["iptables-restore", "--noflush"], stdin=text, timeout=timeout)


def chain_rules(namespace: str | None, table: str, chain: str) -> list[str] | None:
    """The chain's rules in `iptables -S` spelling, or None when there is no such chain."""
    p = run(namespace, ["iptables", "-t", table, "-S", chain], check=False)
    if p.returncode != 0:
        return None
    return [ln for ln in p.stdout.splitlines() if ln.startswith(f"-A {chain} ")]


def has_rule(namespace: str | None, table: str, chain: str, rule: Sequence[str]) -> bool:
    return (
        run(namespace, ["iptables", "-t", table, "-C", chain, *rule], check=False).returncode == 0
    )


def ensure_chain(
    namespace: str | None,
    table: str,
    chain: str,
    rules: list[str],
    jumps: dict[str, Sequence[str]],
) -> bool:
    """Make an owned `chain` hold exactly `rules` and the `jumps` (hook -> rule) exist.

    `rules` are in `iptables -S` spelling. Returns True when anything changed.
    """
    have = chain_rules(namespace, table, chain)
    missing = [hook for hook, rule in jumps.items() if not has_rule(namespace, table, hook, rule)]
    if have == rules and not missing:
        return False
    lines = [f"*{table}", f":{chain} - [0:0]", *rules]
    lines += [f"-I {hook} 1 {quote(jumps[hook])}" for hook in missing]
    lines.append("COMMIT")
    restore(namespace, "\n".join(lines) + "\n")
    return True


def remove_chain(
    namespace: str | None, table: str, chain: str, jumps: dict[str, Sequence[str]]
) -> bool:
    """Take the jumps out and delete `chain`; True if anything was there."""
    changed = False
    for hook, rule in jumps.items():
        while has_rule(namespace, table, hook, rule):
            run(namespace, ["iptables", "-t", table, "-D", hook, *rule])
            changed = True
    if chain_rules(namespace, table, chain) is not None:
        run(namespace, ["iptables", "-t", table, "-F", chain])
        run(namespace, ["iptables", "-t", table, "-X", chain])
        changed = True
    return changed
