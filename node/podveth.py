"""The pod-veth contract: how a pod's host-side veth says which pod it carries.

corral-cni gives each host veth the alias `corral-pod <pod IP> <pod MAC>` in the
same netlink batch that creates it; the overlay's fast path (and the debugging
CLI) read it back from the kernel. Neither side calls the other, so either can
restart alone, and an operator sees the mapping with `ip -d link`.

The alias is also what a pod may send from (corral.node.podguard and the fast
path's from_pod drop everything else). A pod that was explicitly allowed extra
source addresses (the opt-in, see docs/cni.md) carries them as a third field:
`corral-pod <pod IP> <pod MAC> <IPv4 prefix>`.
"""

from __future__ import annotations

import ipaddress

POD_ALIAS_PREFIX = "corral-pod "


def pod_alias(ip: str, mac: str, extra_source: str | None = None) -> str:
    """The alias corral-cni gives a pod's host-side veth."""
    tail = f" {ipaddress.IPv4Network(extra_source)}" if extra_source else ""
    return f"{POD_ALIAS_PREFIX}{ip} {mac.lower()}{tail}"


def _fields(alias: str | None) -> list[str] | None:
    if not alias or not alias.startswith(POD_ALIAS_PREFIX):
        return None
    parts = alias[len(POD_ALIAS_PREFIX) :].split()
    if len(parts) not in (2, 3):
        return None
    try:
        ipaddress.IPv4Address(parts[0])
        if len(parts) == 3:
            ipaddress.IPv4Network(parts[2])
    except ValueError:
        return None
    return parts


def parse_pod_alias(alias: str | None) -> tuple[str, str] | None:
    """(pod IP, pod MAC) from a host veth's alias, or None if it is not one of ours."""
    parts = _fields(alias)
    if parts is None:
        return None
    return parts[0], parts[1].lower()


def pod_extra_source(alias: str | None) -> str | None:
    """The extra source prefix a pod was allowed (the opt-in), or None."""
    parts = _fields(alias)
    return str(ipaddress.IPv4Network(parts[2])) if parts and len(parts) == 3 else None
