"""Changing stored objects the way `label`, `annotate`, `patch` and `edit` do.

Each verb turns an object's wire form into a new one; `revise` validates that
against the object model (an unknown or invalid field is named, nothing written)
and against what may not change, and `write_all` writes every object with a
compare-and-swap on the resourceVersion it was computed from: all objects are
computed and checked before the first write, and one changed meanwhile is read
and computed again (unless the verb says that is a conflict, as `edit` does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from corral.api.manifest import format_validation_error, resolve_kind
from corral.api.objects import Pod, Service, TypedObject, update_forbidden
from corral.api.selectors import matches_label_selector, parse_selector
from corral.api.store import Conflict, NotFound, Store
from corral.cli.common import CLIError

Change = Callable[[TypedObject], dict[str, Any] | None]  # None: nothing to change


def kind_of(word: str) -> type[TypedObject]:
    try:
        return resolve_kind(word)
    except ValueError as e:
        raise CLIError(str(e)) from None


def split_targets(words: list[str]) -> tuple[type[TypedObject], list[str]]:
    """`KIND NAME...` or `KIND/NAME...` to the kind and the names."""
    if not words:
        raise CLIError("name the objects: KIND NAME... or KIND/NAME...")
    if "/" in words[0]:
        kinds, names = set(), []
        for w in words:
            k, _, n = w.partition("/")
            if not n:
                raise CLIError(f"{w!r}: use KIND/NAME")
            kinds.add(kind_of(k))
            names.append(n)
        if len(kinds) > 1:
            raise CLIError("objects of one kind at a time")
        return kinds.pop(), names
    return kind_of(words[0]), words[1:]


def namespace_for(kind: type[TypedObject], ns: str | None) -> str | None:
    return (ns or "default") if kind.NAMESPACED else None


async def find_targets(
    store: Store,
    kind: type[TypedObject],
    names: list[str],
    ns: str | None,
    all_: bool = False,
    selector: str | None = None,
) -> list[TypedObject]:
    """The named objects, or with `--all`/`-l` every (matching) object of the kind."""
    if names and (all_ or selector):
        raise CLIError("give NAMEs or --all/-l, not both")
    if not names and not (all_ or selector):
        raise CLIError(f"name the {kind.PLURAL} to change, or use --all or -l SELECTOR")
    if names:
        found = []
        for name in names:
            o = await store.get(kind, name, ns)
            if o is None:
                where = f" in namespace {ns!r}" if ns else ""
                raise CLIError(f"{kind.PLURAL} {name!r} not found{where}; nothing was changed")
            found.append(o)
        return found
    objs, _ = await store.list(kind, ns)
    try:
        sel = parse_selector(selector)
    except ValueError as e:
        raise CLIError(f"-l {selector}: {e}") from None
    return [o for o in objs if sel is None or matches_label_selector(sel, o.metadata.labels)]


def _pod_spec_frozen(old: Pod, new: Pod) -> str | None:
    """What Kubernetes refuses in a pod update: any spec change but containers' images
    and added tolerations."""
    a, b = old.spec.model_dump(), new.spec.model_dump()
    if len(a["containers"]) == len(b["containers"]):
        for ca, cb in zip(a["containers"], b["containers"], strict=True):
            ca["image"] = cb["image"]
    n = len(a["tolerations"])
    if b["tolerations"][:n] == a["tolerations"]:
        a["tolerations"] = b["tolerations"]
    if a == b:
        return None
    return (
        "spec: a pod's spec may not change once it is created, but for "
        "spec.containers[*].image and added spec.tolerations; delete the pod and "
        "create it again (a ReplicationController or Deployment does that for you)"
    )


def revise(old: TypedObject, doc: dict[str, Any]) -> TypedObject:
    """`doc` as the next version of `old`: validated, identity kept; CLIError naming
    the field otherwise."""
    kind = type(old)
    what = f"{kind.KIND} {old.name!r}"
    if not isinstance(doc, dict):
        raise CLIError(f"{what}: the result is not an object")
    for field, want in (("kind", kind.KIND), ("apiVersion", old.api_version)):
        if doc.get(field) != want:
            raise CLIError(f"{what}: {field}: may not be changed (is {want!r})")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise CLIError(f"{what}: metadata: must be a map")
    for field, want in (
        ("name", old.metadata.name),
        ("namespace", old.metadata.namespace),
        ("uid", old.metadata.uid),
        ("creationTimestamp", old.metadata.creation_timestamp),
    ):
        if meta.get(field, want) != want:
            raise CLIError(f"{what}: metadata.{field}: may not be changed (is {want!r})")
    meta = {**meta, "resourceVersion": old.metadata.resource_version}
    doc = {**doc, "metadata": meta}
    try:
        new = kind.model_validate(doc)
    except ValidationError as e:
        raise CLIError(format_validation_error(e, what) + "\nnothing was changed") from None
    if isinstance(old, Pod):
        why = _pod_spec_frozen(old, new)  # type: ignore[arg-type]
        if why:
            raise CLIError(f"{what}: {why}; nothing was changed")
    if isinstance(old, Service) and isinstance(new, Service):
        ip = old.spec.cluster_ip
        if ip and ip != "None" and new.spec.type != "ExternalName" and new.spec.cluster_ip != ip:
            raise CLIError(
                f"{what}: spec.clusterIP: may not be changed (is {ip!r}); nothing was changed"
            )
    for f, m in update_forbidden(old, new):
        raise CLIError(f"{what}: {f}: {m}; nothing was changed")
    spec_changed = getattr(old, "spec", None) != getattr(new, "spec", None)
    new.metadata.generation = (old.metadata.generation or 1) + (1 if spec_changed else 0)
    return new


def same(a: TypedObject, b: TypedObject) -> bool:
    da, db = a.dump(), b.dump()
    for d in (da, db):
        d["metadata"].pop("generation", None)
        d["metadata"].pop("resourceVersion", None)
    return da == db


async def write_all(
    store: Store,
    objs: list[TypedObject],
    change: Change,
    retry_on_conflict: bool = True,
) -> list[tuple[TypedObject, bool]]:
    """Compute every object's change (`change` -> wire form, None for no change) and
    check it, then write them one by one with a CAS. (object written, changed?)."""
    planned: list[tuple[TypedObject, TypedObject | None]] = []
    for o in objs:
        doc = change(o)
        new = revise(o, doc) if doc is not None else None
        planned.append((o, None if new is None or same(o, new) else new))
    out = []
    for old, new in planned:
        for attempt in range(20):
            if new is None:
                out.append((old, False))
                break
            try:
                out.append((await store.update(new), True))
                break
            except NotFound:
                raise CLIError(f"{old.KIND} {old.name!r} was deleted meanwhile") from None
            except Conflict:
                if not retry_on_conflict:
                    raise
                await asyncio.sleep(0.01 * attempt)
                cur = await store.get(type(old), old.name, old.namespace)
                if cur is None:
                    raise CLIError(f"{old.KIND} {old.name!r} was deleted meanwhile") from None
                doc = change(cur)
                old, new = cur, (revise(cur, doc) if doc is not None else None)
                if new is not None and same(cur, new):
                    new = None
        else:
            raise CLIError(f"{old.KIND} {old.name!r} kept changing; try again")
    return out
