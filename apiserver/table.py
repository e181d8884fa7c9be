"""`as=Table;g=meta.k8s.io;v=v1`: the server-side columns `kubectl get` prints.

Each kind may have its own columns (from its wire form); every kind has NAME and AGE.
Priority-1 columns are the ones `-o wide` adds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

Obj = dict[str, Any]
Column = tuple[str, str, int, Callable[[Obj], Any]]  # name, type, priority, cell


def age(ts: str | None, now: float | None = None) -> str:
    """kubectl's short age: 5s, 3m, 2h, 4d (`<unknown>` when there is no timestamp)."""
    if not ts:
        return "<unknown>"
    try:
        t = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "<unknown>"
    s = max(0, int((time.time() if now is None else now) - t))
    if s < 120:
        return f"{s}s"
    if s < 3600 * 2:
        return f"{s // 60}m"
    if s < 86400 * 2:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def external_ip(
    type_: str, external_ips: list[str], ingress: list[dict[str, Any]], external_name: str | None
) -> str:
    """kubectl's EXTERNAL-IP: externalIPs and LoadBalancer ingress, `<pending>` for a
    LoadBalancer without one yet, the name of an ExternalName."""
    if type_ == "ExternalName":
        return external_name or "<none>"
    ips = [*external_ips]
    if type_ == "LoadBalancer":
        ips += [
            i.get("ip") or i.get("hostname") for i in ingress if i.get("ip") or i.get("hostname")
        ]
        if not ips:
            return "<pending>"
    return ",".join(ips) or "<none>"


def _external_ip(o: Obj) -> str:
    return external_ip(
        _get(o, "spec", "type", default="ClusterIP"),
        _get(o, "spec", "externalIPs", default=[]) or [],
        _get(o, "status", "loadBalancer", "ingress", default=[]) or [],
        _get(o, "spec", "externalName"),
    )


def _get(obj: Obj, *path: str, default: Any = None) -> Any:
    cur: Any = obj
    for p in path:
        if not isinstance(cur, dict):
            return default
        cur = cur.get(p)
    return default if cur is None else cur


def _pod_ready(o: Obj) -> str:
    statuses = _get(o, "status", "containerStatuses", default=[])
    total = len(_get(o, "spec", "containers", default=[]))
    return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"


def _pod_status(o: Obj) -> str:
    if _get(o, "metadata", "deletionTimestamp"):
        return "Terminating"
    for s in _get(o, "status", "containerStatuses", default=[]):
        waiting = _get(s, "state", "waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"])
    return str(_get(o, "status", "reason") or _get(o, "status", "phase", default="Pending"))


def _restarts(o: Obj) -> int:
    return sum(
        int(s.get("restartCount", 0)) for s in _get(o, "status", "containerStatuses", default=[])
    )


def _ports(o: Obj) -> str:
    out = []
    for p in _get(o, "spec", "ports", default=[]):
        s = f"{p.get('port')}"
        if p.get("nodePort"):
            s += f":{p['nodePort']}"
        out.append(f"{s}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


def _selector(sel: Any) -> str:
    if not sel:
        return "<none>"
    if "matchLabels" in sel or "matchExpressions" in sel:
        sel = sel.get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items())) or "<none>"


def _node_status(o: Obj) -> str:
    ready = next(
        (c for c in _get(o, "status", "conditions", default=[]) if c.get("type") == "Ready"), None
    )
    s = "Unknown" if ready is None else ("Ready" if ready.get("status") == "True" else "NotReady")
    if _get(o, "spec", "unschedulable"):
        s += ",SchedulingDisabled"
    return s


def _roles(o: Obj) -> str:
    labels = _get(o, "metadata", "labels", default={})
    roles = sorted(
        k.removeprefix("node-role.kubernetes.io/")
        for k in labels
        if k.startswith("node-role.kubernetes.io/")
    )
    return ",".join(roles) or "<none>"


def _address(o: Obj, typ: str) -> str:
    for a in _get(o, "status", "addresses", default=[]):
        if a.get("type") == typ:
            return str(a.get("address"))
    return "<none>"


def _endpoints(o: Obj) -> str:
    addrs = []
    for s in o.get("subsets") or []:
        ports = [p.get("port") for p in s.get("ports") or []] or [None]
        for a in s.get("addresses") or []:
            addrs += [f"{a['ip']}:{p}" if p else a["ip"] for p in ports]
    return ",".join(addrs[:3]) + (" + more..." if len(addrs) > 3 else "") or "<none>"


_NAME: Column = ("Name", "string", 0, lambda o: _get(o, "metadata", "name", default=""))
_AGE: Column = ("Age", "string", 0, lambda o: age(_get(o, "metadata", "creationTimestamp")))

COLUMNS: dict[str, list[Column]] = {
    "Pod": [
        _NAME,
        ("Ready", "string", 0, _pod_ready),
        ("Status", "string", 0, _pod_status),
        ("Restarts", "integer", 0, _restarts),
        _AGE,
        ("IP", "string", 1, lambda o: _get(o, "status", "podIP", default="<none>")),
        ("Node", "string", 1, lambda o: _get(o, "spec", "nodeName", default="<none>")),
    ],
    "Service": [
        _NAME,
        ("Type", "string", 0, lambda o: _get(o, "spec", "type", default="ClusterIP")),
        ("Cluster-IP", "string", 0, lambda o: _get(o, "spec", "clusterIP", default="<none>")),
        ("External-IP", "string", 0, _external_ip),
        ("Port(s)", "string", 0, _ports),
        _AGE,
        ("Selector", "string", 1, lambda o: _selector(_get(o, "spec", "selector"))),
    ],
    "Node": [
        _NAME,
        ("Status", "string", 0, _node_status),
        ("Roles", "string", 0, _roles),
        _AGE,
        ("Version", "string", 0, lambda o: "corral"),
        ("Internal-IP", "string", 1, lambda o: _address(o, "InternalIP")),
    ],
    "Namespace": [
        _NAME,
        ("Status", "string", 0, lambda o: _get(o, "status", "phase", default="Active")),
        _AGE,
    ],
    "Endpoints": [_NAME, ("Endpoints", "string", 0, _endpoints), _AGE],
    "NetworkPolicy": [
        _NAME,
        ("Pod-Selector", "string", 0, lambda o: _selector(_get(o, "spec", "podSelector"))),
        _AGE,
    ],
    "Deployment": [
        _NAME,
        (
            "Ready",
            "string",
            0,
            lambda o: (
                f"{_get(o, 'status', 'readyReplicas', default=0)}/"
                f"{_get(o, 'spec', 'replicas', default=1)}"
            ),
        ),
        ("Available", "integer", 0, lambda o: _get(o, "status", "availableReplicas", default=0)),
        _AGE,
        ("Selector", "string", 1, lambda o: _selector(_get(o, "spec", "selector"))),
    ],
    "ConfigMap": [
        _NAME,
        (
            "Data",
            "integer",
            0,
            lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}),
        ),
        _AGE,
    ],
    "Secret": [
        _NAME,
        ("Type", "string", 0, lambda o: o.get("type") or "Opaque"),
        ("Data", "integer", 0, lambda o: len(o.get("data") or {})),
        _AGE,
    ],
    "ReplicationController": [
        _NAME,
        ("Desired", "integer", 0, lambda o: _get(o, "spec", "replicas", default=1)),
        ("Current", "integer", 0, lambda o: _get(o, "status", "replicas", default=0)),
        ("Ready", "integer", 0, lambda o: _get(o, "status", "readyReplicas", default=0)),
        _AGE,
    ],
}


def columns(kind: str) -> list[Column]:
    return COLUMNS.get(kind, [_NAME, _AGE])


def partial_metadata(obj: Obj) -> Obj:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata") or {},
    }


def table(
    kind: str,
    objs: list[Obj],
    list_meta: Obj,
    include: str = "Metadata",
) -> Obj:
    """A meta.k8s.io/v1 Table of `objs`; `include`: Object, Metadata (default) or None."""
    cols = columns(kind)
    rows = []
    for o in objs:
        row: Obj = {"cells": [fn(o) for _, _, _, fn in cols]}
        if include == "Object":
            row["object"] = o
        elif include != "None":
            row["object"] = partial_metadata(o)
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": [
            {
                "name": name,
                "type": typ,
                "format": "name" if name == "Name" else "",
                "description": name,
                "priority": prio,
            }
            for name, typ, prio, _ in cols
        ],
        "rows": rows,
    }
