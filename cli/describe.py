"""`corral describe`: an object in detail, with what explains its state.

kubectl shows events here; corral keeps none, so the conditions (with their
reasons and messages, e.g. why a pod is unschedulable) carry that part.
"""

from __future__ import annotations

from collections.abc import Iterable

import yaml

from corral.api.objects import (
    ConfigMap,
    Deployment,
    Endpoints,
    Namespace,
    Node,
    Pod,
    ReplicationController,
    Secret,
    Service,
    TypedObject,
)
from corral.api.selectors import format_selector
from corral.api.store import Store
from corral.cli.output import age, pod_status, prune, table
from corral.control.resources import (
    Resources,
    format_cpu,
    format_memory,
    node_allocatable,
    pod_requests,
)


def _kv(items: Iterable[tuple[str, object]]) -> str:
    rows = [(k, "" if v is None else str(v)) for k, v in items]
    width = max((len(k) for k, _ in rows), default=0) + 2
    return "\n".join(f"{(k + ':').ljust(width)}{v}".rstrip() for k, v in rows)


def _labels(d: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(d.items())) or "<none>"


def _indent(text: str, n: int = 2) -> str:
    return "\n".join((" " * n + line) if line else line for line in text.splitlines())


def _conditions(conds: list) -> str:
    if not conds:
        return "  <none>"
    rows = [[c.type, c.status, c.reason or "", c.message or ""] for c in conds]
    return _indent(table(["Type", "Status", "Reason", "Message"], rows))


def _meta(o: TypedObject) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("Name", o.name)]
    if o.NAMESPACED:
        out.append(("Namespace", o.namespace))
    out += [
        ("Labels", _labels(o.metadata.labels)),
        ("Created", f"{o.metadata.creation_timestamp} ({age(o.metadata.creation_timestamp)} ago)"),
    ]
    return out


def _state(state: dict) -> str:
    if not state:
        return "Waiting"
    (name, detail), *_ = state.items()
    detail = detail or {}
    extra = ", ".join(f"{k}={v}" for k, v in detail.items() if v not in (None, ""))
    return f"{name.capitalize()}" + (f" ({extra})" if extra else "")


def describe_pod(p: Pod) -> str:
    owner = next((r for r in p.metadata.owner_references if r.controller), None)
    head = [
        *_meta(p),
        ("Node", p.spec.node_name or "<none>"),
        ("Status", pod_status(p)),
        ("IP", p.status.pod_ip or "<none>"),
        ("Controlled By", f"{owner.kind}/{owner.name}" if owner else "<none>"),
    ]
    if p.metadata.deletion_timestamp:
        head.append(
            (
                "Terminating",
                f"since {p.metadata.deletion_timestamp} (grace "
                f"{p.metadata.deletion_grace_period_seconds}s)",
            )
        )
    if p.status.reason or p.status.message:
        head.append(("Reason", f"{p.status.reason or ''} {p.status.message or ''}".strip()))
    parts = [_kv(head), "Containers:"]
    statuses = {cs.name: cs for cs in p.status.container_statuses}
    # configMap, secret, downwardAPI and projected volumes are always mounted read-only
    read_only = {
        v.name
        for v in p.spec.volumes
        if v.kind in ("configMap", "secret", "downwardAPI", "projected")
    }
    for c in p.spec.containers:
        cs = statuses.get(c.name)
        rows: list[tuple[str, object]] = [
            ("Command", " ".join([*c.command, *c.args]) or "<none>"),
            ("Image", c.image or "<host filesystem>"),
            (
                "Ports",
                ", ".join(
                    f"{cp.container_port}/{cp.protocol}" + (f" ({cp.name})" if cp.name else "")
                    for cp in c.ports
                )
                or "<none>",
            ),
            ("Requests", _labels({k: str(v) for k, v in c.resources.requests.items()})),
            ("Limits", _labels({k: str(v) for k, v in c.resources.limits.items()})),
            (
                "Mounts",
                ", ".join(
                    f"{m.mount_path} from {m.name}"
                    + (f" ({m.sub_path})" if m.sub_path else "")
                    + (" (ro)" if m.read_only or m.name in read_only else " (rw)")
                    for m in c.volume_mounts
                )
                or "<none>",
            ),
            ("State", _state(cs.state) if cs else "Waiting"),
            ("Ready", cs.ready if cs else False),
            ("Restart Count", cs.restart_count if cs else 0),
        ]
        if cs and cs.last_state:
            rows.insert(7, ("Last State", _state(cs.last_state)))
        parts.append(f"  {c.name}:\n" + _indent(_kv(rows), 4))
    parts += ["Conditions:", _conditions(p.status.conditions)]
    if p.spec.volumes:
        parts.append("Volumes:")
        for v in p.spec.volumes:
            src = getattr(
                v,
                {
                    "emptyDir": "empty_dir",
                    "downwardAPI": "downward_api",
                    "configMap": "config_map",
                    "hostPath": "host_path",
                }.get(v.kind, v.kind),
            )
            detail = ", ".join(f"{k}={val}" for k, val in src.dump().items() if k != "items")
            parts.append(f"  {v.name}: {v.kind}" + (f" ({detail})" if detail else ""))
    if p.spec.node_selector:
        parts.append(_kv([("Node-Selectors", _labels(p.spec.node_selector))]))
    if p.spec.tolerations:
        tol = ", ".join(
            f"{t.key or '*'}{'=' + t.value if t.value else ''}:{t.effect or '*'} op={t.operator}"
            for t in p.spec.tolerations
        )
        parts.append(_kv([("Tolerations", tol)]))
    return "\n".join(parts)


def describe_owner(o: ReplicationController | Deployment, pods: list[Pod]) -> str:
    mine = [p for p in pods if any(r.uid == o.metadata.uid for r in p.metadata.owner_references)]
    phases = {
        ph: sum(1 for p in mine if p.status.phase == ph)
        for ph in ("Running", "Pending", "Succeeded", "Failed")
    }
    tmpl = o.spec.template.spec
    head = [
        *_meta(o),
        ("Selector", format_selector(o.spec.selector)),
        (
            "Replicas",
            f"{o.status.replicas} current / {o.spec.replicas} desired "
            f"({o.status.ready_replicas} ready)",
        ),
        (
            "Pods Status",
            f"{phases['Running']} Running / {phases['Pending']} Waiting / "
            f"{phases['Succeeded']} Succeeded / {phases['Failed']} Failed",
        ),
    ]
    parts = [
        _kv(head),
        "Pod Template:",
        _indent(_kv([("Labels", _labels(o.spec.template.metadata.labels))])),
        "  Containers:",
    ]
    for c in tmpl.containers:
        parts.append(f"   {c.name}: " + (" ".join([*c.command, *c.args]) or "<none>"))
    if mine:
        rows = [
            [
                p.name,
                pod_status(p),
                str(p.ready),
                p.status.pod_ip or "<none>",
                p.spec.node_name or "<none>",
            ]
            for p in sorted(mine, key=lambda p: p.name)
        ]
        parts += ["Pods:", _indent(table(["NAME", "STATUS", "READY", "IP", "NODE"], rows))]
    return "\n".join(parts)


def describe_service(s: Service, ep: Endpoints | None) -> str:
    head = [
        *_meta(s),
        ("Selector", format_selector(s.spec.selector)),
        ("Type", s.spec.type),
        ("IP", s.spec.cluster_ip or "<pending>"),
        ("Session Affinity", s.spec.session_affinity),
    ]
    if s.spec.publish_not_ready_addresses:
        head.append(("Publish Not Ready", "true"))
    for p in s.spec.ports:
        name = p.name or "<unset>"
        head.append(("Port", f"{name}  {p.port}/{p.protocol}"))
        head.append(
            ("TargetPort", f"{p.target_port if p.target_port is not None else p.port}/{p.protocol}")
        )
        if p.node_port:
            head.append(("NodePort", f"{name}  {p.node_port}/{p.protocol}"))
        addrs = []
        for sub in ep.subsets if ep else []:
            ports = [ep_p.port for ep_p in sub.ports if ep_p.name == p.name] or [None]
            addrs += [f"{a.ip}:{ports[0]}" if ports[0] else a.ip for a in sub.addresses]
        head.append(("Endpoints", ",".join(addrs) or "<none>"))
    not_ready = [a.ip for sub in (ep.subsets if ep else []) for a in sub.not_ready_addresses]
    if not_ready:
        head.append(("Not Ready", ",".join(not_ready)))
    return _kv(head)


def describe_node(n: Node, pods: list[Pod]) -> str:
    alloc = node_allocatable(n)
    bound = [
        p
        for p in pods
        if p.spec.node_name == n.name and p.status.phase not in ("Succeeded", "Failed")
    ]
    used = sum((pod_requests(p) for p in bound), start=Resources())
    taints = (
        ", ".join(f"{t.key}{'=' + t.value if t.value else ''}:{t.effect}" for t in n.spec.taints)
        or "<none>"
    )
    head = [
        *_meta(n),
        ("Taints", taints),
        ("Unschedulable", n.spec.unschedulable),
        ("PodCIDR", n.spec.pod_cidr or "<none>"),
        ("Addresses", ", ".join(f"{a.type}={a.address}" for a in n.status.addresses) or "<none>"),
    ]

    def pct(v: int, total: int | None) -> str:
        return f" ({100 * v // total}%)" if total else ""

    parts = [
        _kv(head),
        "Conditions:",
        _conditions(n.status.conditions),
        "Allocatable:",
        _indent(
            _kv(
                [
                    ("cpu", format_cpu(alloc.cpu) if alloc.cpu is not None else "<unlimited>"),
                    (
                        "memory",
                        format_memory(alloc.memory) if alloc.memory is not None else "<unlimited>",
                    ),
                    ("pods", alloc.pods),
                ]
            )
        ),
        "Allocated resources (requests):",
        _indent(
            _kv(
                [
                    ("cpu", format_cpu(used.cpu) + pct(used.cpu, alloc.cpu)),
                    ("memory", format_memory(used.memory) + pct(used.memory, alloc.memory)),
                    ("pods", f"{len(bound)}" + pct(len(bound), alloc.pods)),
                ]
            )
        ),
    ]
    if bound:
        rows = [
            [p.namespace or "", p.name, pod_status(p), p.status.pod_ip or "<none>"]
            for p in sorted(bound, key=lambda p: (p.namespace or "", p.name))
        ]
        parts += [
            f"Non-terminated Pods: ({len(bound)} in total)",
            _indent(table(["NAMESPACE", "NAME", "STATUS", "IP"], rows)),
        ]
    return "\n".join(parts)


def describe_namespace(ns: Namespace, counts: dict[str, int]) -> str:
    status = ns.status.phase
    if ns.metadata.deletion_timestamp:
        status = f"Terminating (since {ns.metadata.deletion_timestamp})"
    parts = [_kv([*_meta(ns), ("Status", status)])]
    if ns.status.conditions:
        parts += ["Conditions:", _conditions(ns.status.conditions)]
    rows = [(plural, n) for plural, n in sorted(counts.items())]
    parts += ["Resources:", _indent(_kv(rows)) if rows else "  <none>"]
    return "\n".join(parts)


def describe_config(o: ConfigMap | Secret) -> str:
    """kubectl's shape: a ConfigMap's values; a Secret's keys and sizes, never its values."""
    head = _meta(o)
    if isinstance(o, Secret):
        head.append(("Type", o.type))
    if o.immutable:
        head.append(("Immutable", "true"))
    parts = [_kv(head), "", "Data", "===="]
    if isinstance(o, Secret):
        parts += [f"{k}:  {len(v)} bytes" for k, v in sorted(o.items().items())]
    else:
        parts += [f"{k}:\n----\n{v}\n" for k, v in sorted(o.data.items())]
        if o.binary_data:
            parts += ["", "BinaryData", "===="]
            parts += [
                f"{k}: {len(v)} bytes" for k, v in sorted(o.items().items()) if k in o.binary_data
            ]
    return "\n".join(parts)


async def describe(store: Store, obj: TypedObject) -> str:
    if isinstance(obj, ConfigMap | Secret):
        return describe_config(obj)
    if isinstance(obj, Pod):
        return describe_pod(obj)
    if isinstance(obj, ReplicationController | Deployment):
        pods, _ = await store.list(Pod, obj.namespace)
        return describe_owner(obj, pods)
    if isinstance(obj, Service):
        return describe_service(obj, await store.get(Endpoints, obj.name, obj.namespace))
    if isinstance(obj, Node):
        pods, _ = await store.list(Pod)
        return describe_node(obj, pods)
    if isinstance(obj, Namespace):
        from corral.control.namespaces import remaining

        return describe_namespace(obj, await remaining(store, obj.name))
    return _kv(_meta(obj)) + "\n" + yaml.safe_dump(prune(obj.dump()), sort_keys=False).rstrip()
