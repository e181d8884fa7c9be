"""Rendering objects for `corral get`: kubectl-style tables, JSON and YAML."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import yaml

from corral.api.objects import (
    ConfigMap,
    Deployment,
    Endpoints,
    EndpointSlice,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    ReplicationController,
    Secret,
    Service,
    TypedObject,
)
from corral.api.selectors import format_selector


def age(ts: str | None, now: datetime | None = None) -> str:
    if not ts:
        return "<unknown>"
    try:
        t = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    s = int(((now or datetime.now(UTC)) - t).total_seconds())
    if s < 0:
        s = 0
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    lines = ["   ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for r in rows:
        lines.append("   ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    return "\n".join(lines)


def _node_row(n: Node, wide: bool) -> list[str]:
    status = "Ready" if n.ready else "NotReady"
    if n.spec.unschedulable:
        status += ",SchedulingDisabled"
    row = [n.name, status, age(n.metadata.creation_timestamp)]
    if wide:
        row += [n.status.address("InternalIP") or "<none>", n.spec.pod_cidr or "<none>"]
    return row


def _init_status(p: Pod) -> str | None:
    """kubectl's Init:N/M, Init:<reason> while init containers run; None once done."""
    inits = p.status.init_container_statuses
    for i, cs in enumerate(inits):
        term = cs.state.get("terminated") or {}
        if term and term.get("exitCode") == 0:
            continue
        if term:
            return f"Init:{term.get('reason') or 'ExitCode:' + str(term.get('exitCode'))}"
        reason = (cs.state.get("waiting") or {}).get("reason")
        if reason and reason != "PodInitializing":
            return f"Init:{reason}"
        return f"Init:{i}/{len(p.spec.init_containers)}"
    return None


def pod_status(p: Pod) -> str:
    if p.metadata.deletion_timestamp:
        return "Terminating"
    init = _init_status(p)
    if init is not None:
        return init
    for cs in p.status.container_statuses:
        waiting = cs.state.get("waiting") or {}
        if waiting.get("reason"):
            return str(waiting["reason"])
        term = cs.state.get("terminated") or {}
        if term.get("reason") and p.status.phase != "Running":
            return str(term["reason"])
    return p.status.reason or p.status.phase


def _pod_row(p: Pod, wide: bool) -> list[str]:
    total = len(p.spec.containers)
    ready = sum(1 for cs in p.status.container_statuses if cs.ready)
    restarts = sum(cs.restart_count for cs in p.status.container_statuses)
    row = [
        p.name,
        f"{ready}/{total}",
        pod_status(p),
        str(restarts),
        age(p.metadata.creation_timestamp),
    ]
    if wide:
        row += [p.status.pod_ip or "<none>", p.spec.node_name or "<none>"]
    return row


def _svc_ports(s: Service) -> str:
    out = []
    for p in s.spec.ports:
        base = f"{p.port}:{p.node_port}" if p.node_port else str(p.port)
        out.append(f"{base}/{p.protocol}")
    return ",".join(out) or "<none>"


def _svc_row(s: Service, wide: bool) -> list[str]:
    cip = s.spec.cluster_ip or ("<none>" if s.spec.type == "ExternalName" else "<pending>")
    ext = ""
    if s.spec.type == "ExternalName":
        ext = s.spec.external_name or ""
    else:
        ips = [*s.spec.external_ips]
        if s.spec.type == "LoadBalancer":
            ips += [i["ip"] for i in s.status.load_balancer.ingress if i.get("ip")]
            ext = ",".join(ips) or "<pending>"
        else:
            ext = ",".join(ips)
    row = [
        s.name,
        s.spec.type,
        cip,
        ext or "<none>",
        _svc_ports(s),
        age(s.metadata.creation_timestamp),
    ]
    if wide:
        sel = s.spec.selector
        row.append(",".join(f"{k}={v}" for k, v in sorted(sel.items())) if sel else "<none>")
    return row


def _ep_row(e: Endpoints, wide: bool) -> list[str]:
    addrs = []
    for sub in e.subsets:
        for a in sub.addresses:
            for p in sub.ports or [None]:
                addrs.append(f"{a.ip}:{p.port}" if p else a.ip)
    shown = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [e.name, shown or "<none>", age(e.metadata.creation_timestamp)]


def _slice_row(e: EndpointSlice, wide: bool) -> list[str]:
    ports = ",".join(str(p.port) for p in e.ports) or "<unset>"
    addrs = [a for ep in e.endpoints for a in ep.addresses]
    return [
        e.name,
        e.address_type,
        ports,
        ",".join(addrs) or "<unset>",
        age(e.metadata.creation_timestamp),
    ]


def _rc_row(r: ReplicationController | Deployment, wide: bool) -> list[str]:
    return [
        r.name,
        str(r.spec.replicas),
        str(r.status.replicas),
        str(r.status.ready_replicas),
        age(r.metadata.creation_timestamp),
    ]


def _ns_row(n: Namespace, wide: bool) -> list[str]:
    return [
        n.name,
        "Terminating" if n.terminating else n.status.phase,
        age(n.metadata.creation_timestamp),
    ]


def _netpol_row(p: NetworkPolicy, wide: bool) -> list[str]:
    return [p.name, format_selector(p.spec.pod_selector), age(p.metadata.creation_timestamp)]


def _cm_row(c: ConfigMap, wide: bool) -> list[str]:
    return [c.name, str(len(c.data) + len(c.binary_data)), age(c.metadata.creation_timestamp)]


def _secret_row(s: Secret, wide: bool) -> list[str]:
    return [s.name, s.type, str(len(s.data)), age(s.metadata.creation_timestamp)]


def _generic_row(o: TypedObject, wide: bool) -> list[str]:
    return [o.name, age(o.metadata.creation_timestamp)]


COLUMNS: dict[type, tuple[list[str], list[str], Callable[[TypedObject, bool], list[str]]]] = {
    Node: (["NAME", "STATUS", "AGE"], ["INTERNAL-IP", "POD-CIDR"], _node_row),  # type: ignore[dict-item]
    Namespace: (["NAME", "STATUS", "AGE"], [], _ns_row),  # type: ignore[dict-item]
    Pod: (["NAME", "READY", "STATUS", "RESTARTS", "AGE"], ["IP", "NODE"], _pod_row),  # type: ignore[dict-item]
    Service: (
        ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"],
        ["SELECTOR"],
        _svc_row,
    ),  # type: ignore[dict-item]
    Endpoints: (["NAME", "ENDPOINTS", "AGE"], [], _ep_row),  # type: ignore[dict-item]
    EndpointSlice: (["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"], [], _slice_row),  # type: ignore[dict-item]
    ReplicationController: (["NAME", "DESIRED", "CURRENT", "READY", "AGE"], [], _rc_row),  # type: ignore[dict-item]
    Deployment: (["NAME", "DESIRED", "CURRENT", "READY", "AGE"], [], _rc_row),  # type: ignore[dict-item]
    NetworkPolicy: (["NAME", "POD-SELECTOR", "AGE"], [], _netpol_row),  # type: ignore[dict-item]
    ConfigMap: (["NAME", "DATA", "AGE"], [], _cm_row),  # type: ignore[dict-item]
    Secret: (["NAME", "TYPE", "DATA", "AGE"], [], _secret_row),  # type: ignore[dict-item]
}


def prune(value: object) -> object:
    """Drop empty maps and lists, as kubectl's output does."""
    if isinstance(value, dict):
        out = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in ({}, [], None)}
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


def as_list(docs: list[object]) -> dict[str, object]:
    """kubectl's `List` wrapper: what `get KIND -o json|yaml` prints for any number of items."""
    return {"apiVersion": "v1", "kind": "List", "items": docs, "metadata": {"resourceVersion": ""}}


def render(
    kind: type[TypedObject],
    objs: list[TypedObject],
    fmt: str | None,
    all_namespaces: bool = False,
    single: bool = False,
) -> str:
    """The objects in format `fmt`. For json/yaml, `single` (one NAME asked for) prints
    the bare object; anything else (a list, several names) is a `List`, as kubectl does."""
    if fmt in ("json", "yaml"):
        docs = [prune(o.dump()) for o in objs]
        if single and len(docs) != 1:
            raise ValueError(f"single=True needs exactly one object, not {len(docs)}")
        data = docs[0] if single else as_list(docs)
        if fmt == "json":
            return json.dumps(data, indent=2)
        return yaml.safe_dump(data, sort_keys=False).rstrip()
    if fmt == "name":
        return "\n".join(f"{kind.PLURAL}/{o.name}" for o in objs)
    headers, rows = table_rows(kind, objs, fmt == "wide", all_namespaces)
    return table(headers, rows)


def table_rows(
    kind: type[TypedObject], objs: Sequence[TypedObject], wide: bool, all_namespaces: bool
) -> tuple[list[str], list[list[str]]]:
    """The table's headers and one row per object (NAMESPACE first with -A)."""
    headers, extra, row = COLUMNS.get(kind, (["NAME", "AGE"], [], _generic_row))
    headers = headers + (extra if wide else [])
    rows = [row(o, wide) for o in objs]
    if all_namespaces and kind.NAMESPACED:
        headers = ["NAMESPACE", *headers]
        rows = [[o.namespace or "", *r] for o, r in zip(objs, rows, strict=True)]
    return headers, rows


class WatchPrinter:
    """What `corral get -w` prints: the table (or objects), then one line per change,
    its columns as wide as those already printed (`events`: an EVENT column first)."""

    def __init__(
        self,
        kind: type[TypedObject],
        fmt: str | None,
        all_namespaces: bool = False,
        events: bool = False,
        write: Callable[[str], None] = print,
    ) -> None:
        self.kind, self.fmt, self.all_namespaces, self.events = kind, fmt, all_namespaces, events
        self.write = write
        self.widths: list[int] = []
        self.headed = False

    def _line(self, cells: list[str]) -> str:
        self.widths += [0] * (len(cells) - len(self.widths))
        self.widths = [max(w, len(c)) for w, c in zip(self.widths, cells, strict=False)]
        return "   ".join(c.ljust(self.widths[i]) for i, c in enumerate(cells)).rstrip()

    def show(self, objs: Sequence[TypedObject], event: str = "ADDED") -> None:
        if not objs:
            return
        if self.fmt in ("json", "yaml", "name"):
            for o in objs:
                self._one(o, event)
            return
        headers, rows = table_rows(self.kind, objs, self.fmt == "wide", self.all_namespaces)
        if self.events:
            headers = ["EVENT", *headers]
            rows = [[event, *r] for r in rows]
        lines = []
        if not self.headed:
            for cells in (headers, *rows):
                self._line(cells)  # the widths of the whole first table, as `get` has
            lines.append(self._line(headers))
            self.headed = True
        lines += [self._line(r) for r in rows]
        self.write("\n".join(lines))

    def _one(self, o: TypedObject, event: str) -> None:
        if self.fmt == "name":
            text = f"{self.kind.PLURAL}/{o.name}"
            self.write(f"{event} {text}" if self.events else text)
            return
        doc: object = prune(o.dump())
        if self.events:
            doc = {"type": event, "object": doc}
        if self.fmt == "json":
            self.write(json.dumps(doc, indent=2))
        else:
            self.write("---\n" + yaml.safe_dump(doc, sort_keys=False).rstrip())
