"""`corral run`, `corral expose`, `corral scale`, `corral describe`: kubectl's habits."""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from typing import Any

from pydantic import ValidationError

from corral.api.manifest import format_validation_error, resolve_kind
from corral.api.objects import (
    Deployment,
    Pod,
    ReplicationController,
    Service,
    TypedObject,
)
from corral.api.quantity import QuantityError, parse_quantity
from corral.api.store import AlreadyExists, NotFound, Store
from corral.cli.cmd_objects import fetch_named
from corral.cli.common import CLIError, add_command_argument, admit, run, store_from_args
from corral.cli.describe import describe
from corral.control.serviceips import AllocationError, Allocator

SCALABLE = (ReplicationController, Deployment)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a command as a pod, or as N replicas (a ReplicationController)",
        description="Without --replicas, make one Pod NAME (as `kubectl run` does); with it, "
        "a ReplicationController NAME whose pods are NAME-<suffix>.",
        usage="corral run NAME [--replicas N] [--port P] [--requests cpu=100m,memory=64Mi] "
        "[options] --command -- CMD [ARGS...]",
    )
    p.add_argument("name", metavar="NAME")
    _run_options(p)
    add_command_argument(p, "CMD ARGS")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("expose", help="make a Service for a replication controller or pod")
    p.add_argument(
        "target",
        nargs="+",
        metavar="[TYPE] NAME",
        help="rc NAME, deploy NAME, pod NAME, TYPE/NAME or just NAME",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="the service port (default: the pods' container port)",
    )
    p.add_argument(
        "--target-port",
        default=None,
        help="the pods' port, number or name (default: their container port, else --port)",
    )
    p.add_argument("--protocol", choices=["TCP", "UDP", "SCTP"], default="TCP")
    p.add_argument("--type", choices=["ClusterIP", "NodePort", "LoadBalancer"], default="ClusterIP")
    p.add_argument("--session-affinity", choices=["None", "ClientIP"], default="None")
    p.add_argument("--name", default=None, help="service name (default: NAME)")
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=cmd_expose)

    p = sub.add_parser("scale", help="set the replicas of a replication controller or deployment")
    p.add_argument("target", nargs="+", metavar="[TYPE] NAME")
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument(
        "--current-replicas", type=int, default=None, help="only scale if the replicas are this now"
    )
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("describe", help="show an object in detail, with what explains its state")
    p.add_argument("kind", metavar="KIND")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-n", "--namespace", default="default")
    p.set_defaults(func=cmd_describe)


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replicas", type=int, default=None, help="keep N pods with a ReplicationController"
    )
    p.add_argument("--port", type=int, default=None, help="the port the container serves on")
    p.add_argument(
        "--requests",
        default=None,
        metavar="cpu=Q,memory=Q",
        help="resource requests, e.g. cpu=100m,memory=64Mi",
    )
    p.add_argument(
        "--limits",
        default=None,
        metavar="cpu=Q,memory=Q",
        help="resource limits, e.g. cpu=500m,memory=128Mi",
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "-l", "--labels", default=None, metavar="k=v,...", help="pod labels (default: run=NAME)"
    )
    p.add_argument(
        "--image", default=None, help="a root filesystem directory to run the command in"
    )
    p.add_argument("--workdir", default=None, help="the command's working directory")
    p.add_argument("--restart", choices=["Always", "OnFailure", "Never"], default="Always")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument(
        "--command",
        action="store_true",
        dest="command_flag",  # not `command`: that is the verb's name in args
        help="accepted for kubectl habit: what follows -- is the command",
    )
    p.add_argument(
        "--expose",
        action="store_true",
        help="also make a ClusterIP Service NAME for --port, as `corral expose` would",
    )


# ---------------------------------------------------------------- helpers


def parse_pairs(text: str | None, flag: str) -> dict[str, str]:
    """`a=b,c=d` to a dict; CLIError naming `flag` if malformed."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise CLIError(f"{flag}: {part!r} is not KEY=VALUE (e.g. {flag} a=b,c=d)")
        out[key.strip()] = value.strip()
    return out


def parse_resources(text: str | None, flag: str) -> dict[str, str]:
    res = parse_pairs(text, flag)
    for key, value in res.items():
        if key not in ("cpu", "memory"):
            raise CLIError(
                f"{flag}: unknown resource {key!r}; use cpu and memory "
                f"(e.g. {flag} cpu=100m,memory=64Mi)"
            )
        try:
            parse_quantity(value)
        except QuantityError as e:
            raise CLIError(f"{flag}: {key}: {e}") from None
    return res


def _validate(cls: type[TypedObject], doc: dict[str, Any], what: str) -> Any:
    try:
        return cls.model_validate(doc)
    except ValidationError as e:
        raise CLIError(format_validation_error(e, what)) from None


def _target(
    words: list[str], kinds: tuple[type[TypedObject], ...]
) -> tuple[tuple[type[TypedObject], ...], str]:
    """`TYPE NAME`, `TYPE/NAME` or `NAME` to the kinds to look in and the name."""
    if len(words) == 1 and "/" in words[0]:
        words = words[0].split("/", 1)
    if len(words) == 1:
        return kinds, words[0]
    if len(words) != 2:
        raise CLIError("give one object: TYPE NAME, TYPE/NAME or NAME")
    try:
        kind = resolve_kind(words[0])
    except ValueError as e:
        raise CLIError(str(e)) from None
    if kind not in kinds:
        choices = ", ".join(k.PLURAL for k in kinds)
        raise CLIError(f"cannot do that to {kind.PLURAL}; only to {choices}")
    return (kind,), words[1]


async def _find(
    store: Store, kinds: tuple[type[TypedObject], ...], name: str, ns: str
) -> TypedObject:
    for kind in kinds:
        obj = await store.get(kind, name, ns)
        if obj is not None:
            return obj
    looked = " or ".join(k.KIND for k in kinds)
    raise CLIError(
        f"no {looked} named {name!r} in namespace {ns!r} (see `corral get "
        f"{kinds[0].PLURAL} -n {ns}`)"
    )


# ---------------------------------------------------------------- run


def build_workload(args: argparse.Namespace) -> Pod | ReplicationController:
    """The Pod (or ReplicationController) `corral run` would create; CLIError if invalid."""
    if len(args.name) > 63 or not _DNS_LABEL.fullmatch(args.name):
        raise CLIError(
            f"NAME {args.name!r} must be a DNS label: at most 63 lowercase letters, "
            "digits or '-', starting and ending with a letter or digit (e.g. web-1)"
        )
    argv = list(args.cmd)
    if not argv:
        raise CLIError("a command is required: corral run NAME [options] --command -- CMD ARGS")
    if args.replicas is not None and args.replicas < 0:
        raise CLIError(f"--replicas {args.replicas}: must be 0 or more")
    labels = parse_pairs(args.labels, "--labels") or {"run": args.name}
    env = []
    for item in args.env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CLIError(f"--env {item!r}: use --env KEY=VALUE")
        env.append({"name": key, "value": value})
    container: dict[str, Any] = {
        "name": args.name,
        "command": argv,
        "env": env,
        "resources": {
            "requests": parse_resources(args.requests, "--requests"),
            "limits": parse_resources(args.limits, "--limits"),
        },
    }
    if args.port is not None:
        container["ports"] = [{"containerPort": args.port}]
    if args.image:
        container["image"] = args.image
    if args.workdir:
        container["workingDir"] = args.workdir
    spec = {"containers": [container], "restartPolicy": args.restart}
    meta = {"name": args.name, "namespace": args.namespace, "labels": labels}
    if args.replicas is None:
        return _validate(Pod, {"metadata": meta, "spec": spec}, f"pod {args.name!r}")
    if args.restart != "Always":
        raise CLIError(
            "--restart must be Always with --replicas (a replication controller restarts its pods)"
        )
    return _validate(
        ReplicationController,
        {
            "metadata": meta,
            "spec": {
                "replicas": args.replicas,
                "selector": labels,
                "template": {"metadata": {"labels": labels}, "spec": spec},
            },
        },
        f"replicationcontroller {args.name!r}",
    )


def cmd_run(args: argparse.Namespace) -> int:
    obj = build_workload(args)
    expose_args = None
    if getattr(args, "expose", False):
        if args.port is None:
            raise CLIError("--expose needs --port: the port the Service forwards to")
        expose_args = argparse.Namespace(
            target=[obj.name],
            port=args.port,
            target_port=None,
            protocol="TCP",
            type="ClusterIP",
            session_affinity="None",
            name=None,
            namespace=args.namespace,
        )

    async def go() -> Service | None:
        async with store_from_args(args) as store:
            if expose_args is not None and await store.get(Service, obj.name, args.namespace):
                raise CLIError(
                    f"service {obj.name!r} already exists in namespace "
                    f"{args.namespace!r}; run without --expose"
                )
            await admit(store, [obj])
            try:
                await store.create(obj)
            except AlreadyExists:
                raise CLIError(
                    f"{type(obj).PLURAL} {obj.name!r} already exists in namespace "
                    f"{obj.namespace!r}; delete it first or pick another name"
                ) from None
            print(f"{type(obj).KIND.lower()}/{obj.name} created")
            return await expose(store, expose_args) if expose_args is not None else None

    svc = run(go)
    if svc is not None:
        print(f"service/{svc.name} created (clusterIP {svc.spec.cluster_ip})")
    return 0


# ---------------------------------------------------------------- expose


def _selector_and_ports(obj: TypedObject) -> tuple[dict[str, str], list[int]]:
    if isinstance(obj, Pod):
        spec, labels = obj.spec, dict(obj.metadata.labels)
    elif isinstance(obj, ReplicationController):
        spec, labels = obj.spec.template.spec, dict(obj.spec.selector or {})
    else:
        assert isinstance(obj, Deployment)
        if obj.spec.selector.match_expressions:
            raise CLIError(
                f"deployment {obj.name!r} selects with matchExpressions, which a "
                "Service selector cannot express; write the Service by hand"
            )
        spec, labels = obj.spec.template.spec, dict(obj.spec.selector.match_labels)
    if not labels:
        raise CLIError(
            f"{obj.KIND.lower()} {obj.name!r} has no labels to select its pods by; add labels first"
        )
    ports = [p.container_port for c in spec.containers for p in c.ports]
    return labels, ports


async def expose(store: Store, args: argparse.Namespace) -> Service:
    kinds, name = _target(args.target, (ReplicationController, Deployment, Pod))
    target = await _find(store, kinds, name, args.namespace)
    selector, container_ports = _selector_and_ports(target)
    port = args.port
    if port is None:
        if not container_ports:
            raise CLIError(
                f"--port is required: {target.KIND.lower()} {name!r} declares no "
                "container port to take it from"
            )
        port = container_ports[0]
    target_port: int | str = port
    if args.target_port is not None:
        target_port = int(args.target_port) if args.target_port.isdigit() else args.target_port
    elif len(set(container_ports)) == 1:
        target_port = container_ports[0]
    spec: dict[str, Any] = {
        "type": args.type,
        "selector": selector,
        "sessionAffinity": args.session_affinity,
        "ports": [{"port": port, "targetPort": target_port, "protocol": args.protocol}],
    }
    svc_name = args.name or name
    svc = _validate(
        Service,
        {
            "metadata": {
                "name": svc_name,
                "namespace": args.namespace,
                "labels": dict(target.metadata.labels),
            },
            "spec": spec,
        },
        f"service {svc_name!r}",
    )
    if await store.get(Service, svc_name, args.namespace) is not None:
        raise CLIError(
            f"service {svc_name!r} already exists in namespace {args.namespace!r}; "
            "pick another with --name"
        )
    await admit(store, [svc])
    svc.metadata.uid = str(uuid.uuid4())
    allocator = Allocator(store)
    try:
        await allocator.fill(svc)
    except AllocationError as e:
        await allocator.release(svc.key_name, keep_uid=None)
        raise CLIError(str(e)) from None
    try:
        return await store.create(svc)
    except AlreadyExists:
        await allocator.release(svc.key_name)
        raise CLIError(
            f"service {svc_name!r} already exists in namespace "
            f"{args.namespace!r}; pick another with --name"
        ) from None


def cmd_expose(args: argparse.Namespace) -> int:
    async def go() -> Service:
        async with store_from_args(args) as store:
            return await expose(store, args)

    svc = run(go)
    extra = "".join(f", nodePort {p.node_port}" for p in svc.spec.ports if p.node_port)
    print(f"service/{svc.name} exposed (clusterIP {svc.spec.cluster_ip}{extra})")
    return 0


# ---------------------------------------------------------------- scale


async def scale(
    store: Store, words: list[str], ns: str, replicas: int, current: int | None = None
) -> TypedObject:
    if replicas < 0:
        raise CLIError(f"--replicas {replicas}: must be 0 or more")
    kinds, name = _target(words, SCALABLE)
    obj = await _find(store, kinds, name, ns)
    kind = type(obj)

    def change(o: Any) -> Any:
        if current is not None and o.spec.replicas != current:
            raise CLIError(
                f"{kind.KIND.lower()} {name!r} has {o.spec.replicas} replicas, "
                f"not --current-replicas {current}; nothing changed"
            )
        if o.spec.replicas == replicas:
            return None
        o.spec.replicas = replicas
        o.metadata.generation = (o.metadata.generation or 1) + 1
        return o

    try:
        return await store.modify(kind, name, ns, change)
    except NotFound:
        raise CLIError(f"{kind.KIND.lower()} {name!r} was deleted meanwhile") from None


def cmd_scale(args: argparse.Namespace) -> int:
    async def go() -> TypedObject:
        async with store_from_args(args) as store:
            return await scale(
                store, args.target, args.namespace, args.replicas, args.current_replicas
            )

    obj = run(go)
    print(f"{obj.KIND.lower()}/{obj.name} scaled")
    return 0


# ---------------------------------------------------------------- describe


def cmd_describe(args: argparse.Namespace) -> int:
    try:
        kind = resolve_kind(args.kind)
    except ValueError as e:
        raise CLIError(str(e)) from None
    ns = args.namespace if kind.NAMESPACED else None

    async def go() -> list[str]:
        async with store_from_args(args) as store:
            if args.names:
                objs = await fetch_named(store, kind, args.names, ns)
            else:
                objs, _ = await store.list(kind, ns)
            return [await describe(store, o) for o in objs]

    texts = run(go)
    if not texts:
        print(f"No {kind.PLURAL} found.", file=sys.stderr)
    print("\n\n".join(texts))
    return 0
