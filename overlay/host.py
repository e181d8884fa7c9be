"""The node namespace's settings the overlay relies on: masquerade, VXLAN conntrack
bypass, IPv4 forwarding. Blocking and idempotent: run from an executor on every
full pass; it returns what it had to change, for the log."""

from __future__ import annotations

from corral.api.objects import NetworkSpec
from corral.node import sysctl
from corral.overlay import masq, notrack


def apply(ns: str | None, spec: NetworkSpec, ip_forward: bool) -> list[str]:
    changes = []
    if masq.ensure(ns, spec.network, spec.ip_masq):
        on = "on" if spec.ip_masq else "off"
        changes.append(f"masquerade for pods leaving {spec.network}: {on}")
    if notrack.ensure(ns, spec.backend.port):
        changes.append(f"VXLAN packets on UDP port {spec.backend.port} skip conntrack")
    if ip_forward and sysctl.ensure("net.ipv4.ip_forward", "1", ns):
        changes.append("IPv4 forwarding on")
    return changes
