"""The pod-veth contract: how a pod's host-side veth says which pod it carries.

corral-cni gives each host veth the alias `corral-pod <pod IP> <pod MAC>` in the
same netlink batch that creates it; the overlay's fast path (and the debugging
CLI) read it back from the kernel. Neither side calls the other, so either can
restart alone, and an operator sees the mapping with `ip -d link`.
"""

from __future__ import annotations

import ipaddress

POD_ALIAS_PREFIX = "corral-pod "


def pod_alias(ip: str, mac: str) -> str:
    """The alias corral-cni gives a pod's host-side veth."""
    return f"{POD_ALIAS_PREFIX}{ip} {mac.lower()}"


def parse_pod_alias(alias: str | None) -> tuple[str, str] | None:
    """(pod IP, pod MAC) from a host veth's alias, or None if it is not one of ours."""
    if not alias or not alias.startswith(POD_ALIAS_PREFIX):
        return None
    parts = alias[len(POD_ALIAS_PREFIX) :].split()
    if len(parts) != 2:
        return None
    try:
        ipaddress.IPv4Address(parts[0])
    except ValueError:
        return None
    return parts[0], parts[1].lower()
