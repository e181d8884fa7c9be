"""The downward API: a pod's own fields and its containers' resources as strings, for
env.valueFrom (fieldRef, resourceFieldRef) and downwardAPI volumes, formatted as the
kubelet formats them (pkg/kubelet/kubelet_pods.go, pkg/api/v1/resource)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from corral.api.objects import Container, Pod
from corral.api.quantity import parse_quantity

_SUBSCRIPTED = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


@dataclass
class PodFacts:
    """What the downward API reads besides the Pod object: the node's view of it."""

    pod: Pod
    node_name: str
    pod_ip: str | None
    host_ip: str | None


def _quote(v: str) -> str:
    # Go's %q for the label/annotation files: ASCII escapes as JSON spells them
    out = ['"']
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join([*out, '"'])


def format_map(d: dict[str, str]) -> str:
    """metadata.labels/annotations as a downwardAPI file: `key="value"` lines, sorted."""
    return "".join(f"{k}={_quote(v)}\n" for k, v in sorted(d.items()))


def field_value(facts: PodFacts, path: str) -> str:
    p, md = facts.pod, facts.pod.metadata
    m = _SUBSCRIPTED.match(path)
    if m:
        src = md.labels if m[1] == "labels" else md.annotations
        return src.get(m[2], "")
    if path == "metadata.name":
        return md.name or ""
    if path == "metadata.namespace":
        return md.namespace or "default"
    if path == "metadata.uid":
        return md.uid or ""
    if path == "metadata.labels":
        return format_map(md.labels)
    if path == "metadata.annotations":
        return format_map(md.annotations)
    if path == "spec.nodeName":
        return p.spec.node_name or facts.node_name
    if path == "spec.serviceAccountName":
        return p.spec.service_account_name or "default"  # what admission would have set
    if path in ("status.podIP", "status.podIPs"):
        return facts.pod_ip or ""
    if path in ("status.hostIP", "status.hostIPs"):
        return facts.host_ip or ""
    raise ValueError(f"fieldPath {path!r} is not supported")


def node_allocatable() -> dict[str, int]:
    """cpu (millicores) and memory (bytes) of this machine: what an unset limit means."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": (os.cpu_count() or 1) * 1000, "memory": mem, "ephemeral-storage": 0}


def resource_value(c: Container, resource: str, divisor: str | int | float | None) -> str:
    """limits.cpu etc. of container `c` in units of `divisor` (rounded up); an unset
    limit is the node's allocatable, an unset request 0 (the kubelet's rules)."""
    kind, _, name = resource.partition(".")
    src = c.resources.limits if kind == "limits" else c.resources.requests
    if name in src:
        value = parse_quantity(src[name])
    elif kind == "limits":
        alloc = node_allocatable()[name]
        value = parse_quantity(f"{alloc}m") if name == "cpu" else parse_quantity(alloc)
    else:
        value = parse_quantity(0)
    div = parse_quantity(divisor if divisor is not None else 1)
    if name == "cpu":  # in millicores first, as the kubelet does
        return str(math.ceil((value * 1000) / (div * 1000)))
    return str(math.ceil(value / div))
