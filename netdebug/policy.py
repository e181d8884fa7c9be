"""`corral net policy POD` and trace's policy hop: NetworkPolicy as etcd says it applies.

Both come from the engine the node agents enforce with (netpolicy/model.py), fed
with the cluster as etcd holds it; `corral net policy` also shows what the pod's
node has programmed (its `netpolicy` debug dump), so a node that has not caught
up (or has drifted) shows as a difference.
"""

from __future__ import annotations

from typing import Any

from corral.netdebug.model import ClusterView
from corral.netdebug.render import Out
from corral.netpolicy.component import describe
from corral.netpolicy.model import Model, Verdict


class PolicyError(RuntimeError):
    pass


def model_of(cv: ClusterView) -> Model:
    return Model.of(cv.pods, cv.namespaces, cv.policies)


def effective(cv: ClusterView, pod: str, node_dump: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pod's effective ingress and egress (and, given its node's `netpolicy` dump,
    what the node programmed and whether it agrees)."""
    ns, _, name = pod.rpartition("/")
    key = f"{ns or 'default'}/{name}"
    m = model_of(cv)
    info = m.by_key.get(key)
    if info is None:
        raise PolicyError(
            f"pod {key} not found, or it has no IP of its own (hostNetwork, not started)"
        )
    out: dict[str, Any] = {"pod": key, "node": info.node, **describe(m.policy_of(info))}
    if node_dump is not None:
        programmed = (node_dump.get("pods") or {}).get(key)
        out["node_programmed"] = programmed
        out["node_fast_path_map"] = bool(node_dump.get("fast_path_map"))
        out["recent_drops"] = [
            line for line in node_dump.get("dropped_flows") or [] if f" of {key}," in line
        ]
        mine = {k: out[k] for k in ("ip", "ingress", "egress")}
        out["node_agrees"] = programmed == mine
    return out


def print_effective(d: dict[str, Any], out: Out) -> None:
    out.line(f"pod {d['pod']} {d['ip']} on {d['node']}")
    for direction in ("ingress", "egress"):
        e = d[direction]
        if not e["isolated"]:
            out.line(f"  {direction}: not isolated, everything allowed (no policy selects it)")
            continue
        out.line(f"  {direction}: isolated by {', '.join(e['policies'])}")
        for a in e["allow"]:
            out.line(f"    allow {a}")
        out.line("    everything else: default deny")
    for line in d.get("recent_drops") or []:
        out.line(f"  logged: {line}")
    if "node_agrees" in d:
        out.line(
            "  node: programmed as shown"
            if d["node_agrees"]
            else f"  node: programmed differently (not caught up?): {d['node_programmed']}"
        )


def verdict(cv: ClusterView, src_ip: str, dst_ip: str, proto: str, port: int | None) -> Verdict:
    return model_of(cv).verdict(src_ip, dst_ip, proto.upper() or "TCP", port or 0)
