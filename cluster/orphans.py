"""Processes of a cluster that its state file lost track of (a crash between
starting one and recording it, a state directory removed by hand): found by
their command lines, so `up` and `down` can stop them."""

from __future__ import annotations

import os
import re


def cmdlines() -> dict[int, list[bytes]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().split(b"\0")
            except OSError:
                continue
    return out


def etcd_orphans(state_dir: str, host_ips: list[str] | None = None) -> list[int]:
    """etcd processes the state file lost track of: those serving this cluster's data
    dir, or listening on the host's underlay address (only this cluster's etcd does)."""
    data = re.compile(re.escape(os.path.join(state_dir, "etcd")).encode() + rb"(-\d+)?$")
    urls = [f"{sch}://{ip}:".encode() for ip in host_ips or [] for sch in ("http", "https")]

    def ours(args: list[bytes]) -> bool:
        for i in range(len(args) - 1):
            if args[i] == b"--data-dir" and data.match(args[i + 1]):
                return True
            if args[i] == b"--listen-client-urls" and any(u in args[i + 1] for u in urls):
                return True
        return False

    return [
        pid
        for pid, args in cmdlines().items()
        if args and os.path.basename(args[0]) == b"etcd" and ours(args)
    ]


def relay_orphans(name: str) -> list[int]:
    """Relays into this cluster's nodes that the state file lost track of."""
    pattern = re.compile(rf"^{re.escape(name)}-node-\d+$".encode())
    return [
        pid
        for pid, args in cmdlines().items()
        if b"corral.cluster.relay" in args
        and any(args[i] == b"--netns" and pattern.match(args[i + 1]) for i in range(len(args) - 1))
    ]
