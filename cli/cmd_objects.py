"""`corral apply`, `create`, `get` (and `-w`), `delete`: objects in etcd, kubectl-style."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from pydantic import ValidationError

from corral.api.manifest import ManifestError, format_validation_error, load_file, resolve_kind
from corral.api.namespaces import BUILTIN, NamespaceError, new_namespace
from corral.api.objects import (
    Deployment,
    Endpoints,
    EndpointSlice,
    Namespace,
    NetworkConfig,
    Pod,
    ReplicationController,
    Service,
    TypedObject,
)
from corral.api.selectors import matches_label_selector, parse_selector
from corral.api.store import Store, now_iso, object_key
from corral.cli import create_config
from corral.cli.apply_objects import ImmutableError, Planned, apply_objects, read_existing
from corral.cli.common import CLIError, run, store_from_args
from corral.cli.output import WatchPrinter, render
from corral.control.podlifecycle import delete_pod


def register(sub: Any) -> None:
    p = sub.add_parser("apply", help="create or update objects from YAML/JSON manifests")
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="manifest file, directory of manifests, or - for stdin (repeatable)",
    )
    p.add_argument("-n", "--namespace", help="namespace for objects that name none")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser(
        "create",
        help="create objects from manifests (an error if one exists), or a namespace",
        usage="corral create -f FILE [-n NS] | corral create namespace NAME | "
        + create_config.USAGE.replace("corral create ", "corral create [-n NS] "),
    )
    p.add_argument("what", nargs="*", metavar="namespace NAME")
    create_config.add_arguments(p)
    p.add_argument("-f", "--filename", action="append", metavar="FILE")
    p.add_argument("-n", "--namespace", help="namespace for objects that name none")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("get", help="list objects: nodes, pods, services, endpoints, ...")
    p.add_argument("kind", metavar="KIND", help="nodes|pods|services|endpoints|rc|ns|...")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["wide", "json", "yaml", "name"])
    p.add_argument("-l", "--selector", help="label selector, e.g. app=web,tier!=db")
    p.add_argument(
        "-w", "--watch", action="store_true", help="after the list, print each change as it happens"
    )
    p.add_argument(
        "--watch-only", action="store_true", help="print only the changes, not the list first"
    )
    p.add_argument(
        "--output-watch-events",
        action="store_true",
        help="with -w: say what happened to each object (ADDED, MODIFIED, DELETED)",
    )
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", help="delete objects by kind and name, or from manifests")
    p.add_argument("kind", nargs="?", metavar="KIND")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-f", "--filename", action="append", metavar="FILE")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="seconds pods get to stop (default: the pod's own)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="remove pods from etcd at once, without waiting for their node",
    )
    p.add_argument("--ignore-not-found", action="store_true")
    p.add_argument(
        "--wait",
        action="store_true",
        help="return once the objects are gone (pods stopped by their nodes, namespaces "
        "emptied), not when their deletion has begun",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0,
        metavar="SECONDS",
        help="with --wait: give up after this long (default 0: no limit)",
    )
    p.set_defaults(func=cmd_delete)


# ---------------------------------------------------------------- apply


def _manifest_paths(items: list[str]) -> list[str]:
    paths = []
    for item in items:
        if item != "-" and os.path.isdir(item):
            for name in sorted(os.listdir(item)):
                if name.endswith((".yaml", ".yml", ".json")):
                    paths.append(os.path.join(item, name))
        else:
            paths.append(item)
    return paths


def _load_all(files: list[str], namespace: str | None) -> list[TypedObject]:
    objs: list[TypedObject] = []
    errors = []
    for path in _manifest_paths(files):
        try:
            objs.extend(load_file(path))
        except ManifestError as e:
            errors.append(str(e))
    if errors:
        raise CLIError("nothing was applied:\n" + "\n".join(errors))
    if namespace:
        for o in objs:
            if type(o).NAMESPACED and o.metadata.namespace in (None, "default"):
                o.metadata.namespace = namespace
    return objs


def cmd_apply(args: argparse.Namespace) -> int:
    # Validate every document before changing anything: a bad file applies nothing.
    objs = _load_all(args.filename, args.namespace)

    async def go() -> list[Planned]:
        async with store_from_args(args) as store:
            await _cluster_checks(store, objs)
            try:
                return await apply_objects(store, objs)
            except NamespaceError as e:
                raise CLIError(f"{e}; nothing was applied") from None
            except ImmutableError as e:
                raise CLIError(str(e)) from None

    planned = run(go)
    sys.stdout.write(
        "".join(f"{type(p.obj).KIND.lower()}/{p.obj.name} {p.verb}\n" for p in planned)
    )
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    if args.filename and args.what:
        raise CLIError("give either -f FILE or what to create (e.g. `namespace NAME`), not both")
    if args.filename:
        objs = _load_all(args.filename, args.namespace)
    elif len(args.what) == 2 and args.what[0].lower() in ("namespace", "namespaces", "ns"):
        try:
            objs = [new_namespace(args.what[1])]
        except ValidationError as e:
            raise CLIError(format_validation_error(e, "namespace: metadata.name")) from None
    elif args.what and args.what[0].lower() in (
        "configmap",
        "configmaps",
        "cm",
        "secret",
        "secrets",
    ):
        objs = [create_config.build([args.what[0].lower(), *args.what[1:]], args)]
    else:
        raise CLIError(
            "create needs -f FILE, `namespace NAME`, `configmap NAME ...` or `secret TYPE NAME "
            "...` (e.g. `corral create namespace shop`)"
        )

    async def go() -> list[Planned]:
        async with store_from_args(args) as store:
            await _cluster_checks(store, objs)
            existing = await read_existing(store, objs)
            for o in objs:
                if object_key(type(o), o.name, o.namespace) in existing:
                    where = f" in namespace {o.namespace!r}" if type(o).NAMESPACED else ""
                    raise CLIError(
                        f"{type(o).PLURAL} {o.name!r} already exists{where}; nothing was "
                        "created (`corral apply` updates it)"
                    )
            try:
                return await apply_objects(store, objs)
            except NamespaceError as e:
                raise CLIError(f"{e}; nothing was created") from None

    for p in run(go):
        print(f"{type(p.obj).KIND.lower()}/{p.obj.name} created")
    return 0


async def _cluster_checks(store: Store, objs: list[TypedObject]) -> None:
    """Checks that need the cluster's state, all done before anything is written."""
    from corral.api.netconfig import ConfigError, check_config

    for obj in objs:
        if isinstance(obj, NetworkConfig):
            if obj.name != "cluster":
                raise CLIError(
                    f"NetworkConfig {obj.name!r}: the cluster's network config is "
                    "named 'cluster'; nothing was applied"
                )
            try:
                await check_config(store, obj.spec)
            except ConfigError as e:
                raise CLIError(
                    f"NetworkConfig 'cluster' refused: {e}; nothing was applied"
                ) from None


# ---------------------------------------------------------------- get


def _kind(word: str) -> type[TypedObject]:
    try:
        return resolve_kind(word)
    except ValueError as e:
        raise CLIError(str(e)) from None


async def fetch_named(
    store: Store, kind: type[TypedObject], names: list[str], ns: str | None
) -> list[TypedObject]:
    """The named objects, in order; CLIError naming the first that does not exist."""
    found = []
    for name in names:
        o = await store.get(kind, name, ns)
        if o is None:
            where = f" in namespace {ns!r}" if kind.NAMESPACED and ns else ""
            raise CLIError(f"{kind.PLURAL} {name!r} not found{where}")
        found.append(o)
    return found


def cmd_get(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)
    ns = None if args.all_namespaces else (args.namespace or "default")
    try:
        sel = parse_selector(args.selector)
    except ValueError as e:
        raise CLIError(f"-l {args.selector}: {e}") from None
    if args.watch or args.watch_only:
        return watch(args, kind, ns, sel)

    async def go() -> list[TypedObject]:
        async with store_from_args(args) as store:
            if args.names:
                return await fetch_named(store, kind, args.names, ns)
            objs, _ = await store.list(kind, ns if kind.NAMESPACED else None)
            if sel is None:
                return objs
            return [o for o in objs if matches_label_selector(sel, o.metadata.labels)]

    objs = run(go)
    if not objs and args.output not in ("json", "yaml"):
        where = f" in {ns} namespace" if kind.NAMESPACED and ns else ""
        print(f"No resources found{where}.", file=sys.stderr)
        return 0
    single = len(args.names) == 1
    print(render(kind, objs, args.output, all_namespaces=args.all_namespaces, single=single))
    return 0


def watch(args: argparse.Namespace, kind: type[TypedObject], ns: str | None, sel: Any) -> int:
    """`get -w`: the list, then every change from the revision it was read at on (a
    deleted object is printed as it last was), until interrupted."""
    names = set(args.names)

    def wanted(o: TypedObject) -> bool:
        if names and o.name not in names:
            return False
        return sel is None or matches_label_selector(sel, o.metadata.labels)

    def write(text: str) -> None:
        print(text, flush=True)

    printer = WatchPrinter(
        kind,
        args.output,
        all_namespaces=args.all_namespaces,
        events=args.output_watch_events,
        write=write,
    )
    scope = ns if kind.NAMESPACED else None

    async def go() -> None:
        async with store_from_args(args) as store:
            objs, rev = await store.list(kind, scope)
            known = {
                object_key(kind, o.name, o.namespace): int(o.metadata.resource_version or 0)
                for o in objs
            }
            shown = {o.key_name: o for o in objs if wanted(o)}
            if not args.watch_only:
                printer.show(list(shown.values()))
            async for ev in store.watch(kind, scope, start_revision=rev + 1, known=known):
                if ev.type == "DELETED":
                    last = shown.pop(ev.object, None)
                    if last is not None:
                        printer.show([last], "DELETED")
                    continue
                obj = ev.object
                if not wanted(obj):
                    if shown.pop(obj.key_name, None) is not None:
                        printer.show([obj], "DELETED")  # it left the selection
                    continue
                event = "MODIFIED" if obj.key_name in shown else "ADDED"
                shown[obj.key_name] = obj
                printer.show([obj], event)

    run(go)
    return 0


# ---------------------------------------------------------------- delete


async def delete_object(
    store: Store,
    kind: type[TypedObject],
    name: str,
    ns: str | None,
    grace: int | None = None,
    force: bool = False,
) -> bool:
    """Delete one object the way its controllers expect. False if it did not exist.

    A pod bound to a node is only marked (deletionTimestamp): its node stops the
    containers within the grace period, releases its IP and then removes it.
    Controllers' pods go with them; a service takes its endpoints along.
    """
    obj = await store.get(kind, name, ns)
    if obj is None:
        return False
    if isinstance(obj, Namespace):
        await delete_namespace(store, obj, force)
        return True
    if kind is Pod:
        await delete_pod(store, obj, graceful=not force, grace=grace)  # type: ignore[arg-type]
        return True
    if kind in (ReplicationController, Deployment):
        await store.delete(kind, name, ns)
        pods, _ = await store.list(Pod, ns)
        for p in pods:
            if any(r.uid == obj.metadata.uid for r in p.metadata.owner_references):
                await delete_pod(store, p, graceful=not force, grace=grace)
        return True
    await store.delete(kind, name, ns)
    if kind is Service:
        await store.delete(Endpoints, name, ns)
        await store.delete(EndpointSlice, name, ns)
    return True


async def delete_namespace(store: Store, ns: Namespace, force: bool = False) -> None:
    """Mark `ns` Terminating: the namespace controller deletes what it holds (pods
    gracefully), then the namespace. `force`: do that here and now, pods at once."""
    if ns.name in BUILTIN:
        raise CLIError(f"namespace {ns.name!r} is built in and may not be deleted")

    def mark(cur: Namespace) -> Namespace | None:
        if cur.metadata.deletion_timestamp and cur.status.phase == "Terminating":
            return None
        cur.metadata.deletion_timestamp = cur.metadata.deletion_timestamp or now_iso()
        cur.status.phase = "Terminating"
        return cur

    marked = await store.modify(Namespace, ns.name, None, mark)
    if force:
        from corral.control.namespaces import finalize

        if not await finalize(store, marked, force=True):
            cur = await store.get(Namespace, ns.name)
            if cur is not None and not await finalize(store, cur, force=True):
                raise CLIError(
                    f"namespace {ns.name!r}: not everything could be deleted; see "
                    f"`corral describe namespace {ns.name}`"
                )


def cmd_delete(args: argparse.Namespace) -> int:
    targets: list[tuple[type[TypedObject], str, str | None]] = []
    if args.filename:
        if args.kind:
            raise CLIError("give either KIND NAME... or -f FILE, not both")
        for o in _load_all(args.filename, args.namespace):
            targets.append((type(o), o.name, o.namespace))
    else:
        if not args.kind or not args.names:
            raise CLIError(
                "delete needs KIND and at least one NAME (e.g. `corral delete pod web`), or -f FILE"
            )
        kind = _kind(args.kind)
        ns = (args.namespace or "default") if kind.NAMESPACED else None
        targets = [(kind, n, ns) for n in args.names]

    async def go() -> int:
        missing = 0
        deleted = []
        async with store_from_args(args) as store:
            for kind, name, ns in targets:
                if await delete_object(store, kind, name, ns, args.grace_period, args.force):
                    print(f"{kind.KIND.lower()}/{name} deleted", flush=True)
                    deleted.append((kind, name, ns))
                elif not args.ignore_not_found:
                    where = f" in namespace {ns!r}" if ns else ""
                    print(f"error: {kind.PLURAL} {name!r} not found{where}", file=sys.stderr)
                    missing += 1
            if args.wait:
                await wait_gone(store, deleted, args.timeout)
        return 1 if missing else 0

    return run(go)


async def wait_gone(
    store: Store, targets: list[tuple[type[TypedObject], str, str | None]], timeout: float
) -> None:
    """Until every target is gone; CLIError naming what is left after `timeout` (0: none)."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    left = list(targets)
    while left:
        still = []
        for kind, name, ns in left:
            if await store.get(kind, name, ns) is not None:
                still.append((kind, name, ns))
        left = still
        if not left:
            return
        if deadline is not None and time.monotonic() > deadline:
            what = []
            for kind, name, ns in left:
                obj = await store.get(kind, name, ns)
                why = ""
                if isinstance(obj, Namespace):
                    cond = obj.status.condition("NamespaceContentRemaining")
                    why = f" ({cond.message})" if cond and cond.status == "True" else ""
                    why = why or " (is `corral controllers` running?)"
                what.append(f"{kind.KIND.lower()}/{name}{why}")
            raise CLIError(f"still there after {timeout:g}s: {', '.join(what)}")
        await asyncio.sleep(0.3)
