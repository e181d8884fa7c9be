"""Field ownership (`metadata.managedFields`) and server-side apply, as kube-apiserver.

A field set is a set of paths; a path is a tuple of FieldsV1 elements: `f:<name>` for
a field or map key, `k:<json>` for the item of a keyed list (the merge keys of
`api/patch.py`), `v:<json>` for a value of a set-like list. Lists without a key are
atomic: one leaf. A path ending in an item (`k:`/`v:`) or naming a leaf (a scalar, an
atomic list, an empty map) is a member; FieldsV1 marks an item itself with `"."`.

Every write through the API server records who changed which fields: `Update`
entries for create/update/patch (the manager is `fieldManager`, else the client's
User-Agent program name), `Apply` entries for server-side apply, which also:
- creates the object when it does not exist;
- refuses (409 Conflict, one cause per field) to change a value another manager owns,
  unless `force=true`, which takes the field over;
- removes what the manager applied before and applies no more, when nobody else owns
  it (how a field deleted from the applied file leaves the object).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from corral.api.fields import field_named, model_of
from corral.api.patch import MERGE_KEYS, SET_LISTS, strategic_merge
from corral.apiserver import errors

Path = tuple[str, ...]
Obj = dict[str, Any]

# Set by the server, never owned by anyone.
UNOWNED_META = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
}


def _j(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def _sub(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    found = field_named(model, key) if model is not None else None
    return model_of(found[1].annotation) if found else None


def field_set(obj: Obj, model: type[BaseModel] | None, subresource: str = "") -> set[Path]:
    """The members of `obj` (wire form of `model`): what a manager owns by writing it."""
    out: set[Path] = set()
    for key, value in obj.items():
        if key in ("apiVersion", "kind"):
            continue
        if (key == "status") != (subresource == "status"):
            continue
        if key == "metadata" and isinstance(value, dict):
            meta = {k: v for k, v in value.items() if k not in UNOWNED_META}
            _walk(meta, _sub(model, "metadata"), ("f:metadata",), out)
            continue
        _walk_value(value, model, key, ("f:" + key,), out)
    return out


def _walk(obj: Obj, model: type[BaseModel] | None, at: Path, out: set[Path]) -> None:
    if not obj:
        return
    for key, value in obj.items():
        _walk_value(value, model, key, (*at, "f:" + key), out)


def _walk_value(
    value: Any, model: type[BaseModel] | None, key: str, at: Path, out: set[Path]
) -> None:
    sub = _sub(model, key)
    name = model.__name__ if model is not None else ""
    if isinstance(value, dict):
        if not value:
            out.add(at)
        else:
            _walk(value, sub, at, out)
    elif isinstance(value, list) and (name, key) in MERGE_KEYS:
        mk = MERGE_KEYS[(name, key)]
        for item in value:
            if isinstance(item, dict) and mk in item:
                here = (*at, "k:" + _j({mk: item[mk]}))
                out.add(here)
                _walk(item, sub, here, out)
    elif isinstance(value, list) and (name, key) in SET_LISTS:
        for item in value:
            out.add((*at, "v:" + _j(item)))
    else:
        out.add(at)


def to_fields_v1(paths: Iterable[Path]) -> Obj:
    root: Obj = {}
    for p in sorted(paths):
        node = root
        for el in p:
            node = node.setdefault(el, {})
        if p and p[-1].startswith("k:"):
            node["."] = {}  # the item itself, beside its fields
    return root


def from_fields_v1(doc: Any, at: Path = ()) -> set[Path]:
    out: set[Path] = set()
    if not isinstance(doc, dict):
        return out
    if "." in doc or (not doc and at):
        out.add(at)
    for el, sub in doc.items():
        if el != ".":
            out |= from_fields_v1(sub, (*at, el))
    return out


_MISSING = object()


def value_at(obj: Any, path: Path) -> Any:
    node = obj
    for el in path:
        kind, _, rest = el.partition(":")
        if kind == "f" and isinstance(node, dict):
            node = node.get(rest, _MISSING)
        elif kind == "k" and isinstance(node, list):
            want = json.loads(rest)
            node = next(
                (
                    i
                    for i in node
                    if isinstance(i, dict) and all(i.get(k) == v for k, v in want.items())
                ),
                _MISSING,
            )
        elif kind == "v" and isinstance(node, list):
            v = json.loads(rest)
            node = v if v in node else _MISSING
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def remove_at(obj: Any, path: Path) -> None:
    if not path:
        return
    parent = value_at(obj, path[:-1])
    kind, _, rest = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(rest, None)
    elif kind == "k" and isinstance(parent, list):
        want = json.loads(rest)
        parent[:] = [
            i
            for i in parent
            if not (isinstance(i, dict) and all(i.get(k) == v for k, v in want.items()))
        ]
    elif kind == "v" and isinstance(parent, list):
        v = json.loads(rest)
        parent[:] = [i for i in parent if i != v]


def _render(path: Path) -> str:
    """kube's spelling of a path in a conflict: .spec.replicas, .spec.containers[name="c"].image"""
    out = ""
    for el in path:
        kind, _, rest = el.partition(":")
        if kind == "f":
            out += "." + rest
        elif kind == "k":
            out += "[" + ",".join(f"{k}={_j(v)}" for k, v in json.loads(rest).items()) + "]"
        else:
            out += f"[={rest}]"
    return out


def _entries(obj: Obj | None) -> list[Obj]:
    meta = (obj or {}).get("metadata") or {}
    return [dict(e) for e in meta.get("managedFields") or [] if isinstance(e, dict)]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry(manager: str, op: str, api_version: str, paths: set[Path], sub: str) -> Obj:
    e: Obj = {
        "manager": manager,
        "operation": op,
        "apiVersion": api_version,
        "time": _now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields_v1(paths),
    }
    if sub:
        e["subresource"] = sub
    return e


def _same(e: Obj, manager: str, op: str, sub: str) -> bool:
    return (
        e.get("manager") == manager
        and e.get("operation") == op
        and (e.get("subresource") or "") == sub
    )


def _store(new: Obj, entries: list[Obj]) -> Obj:
    entries = [e for e in entries if e.get("fieldsV1")]
    new.setdefault("metadata", {})["managedFields"] = entries
    return new


def record_update(old: Obj | None, new: Obj, manager: str, res: Any, sub: str = "") -> Obj:
    """`new` with managedFields after an Update by `manager` of resource `res`: it owns
    what it changed; others keep the rest; fields gone from the object are nobody's.
    A write that changes no field leaves managedFields exactly as they were."""
    model, api_version = res.model, res.group_version
    now = field_set(new, model, sub)
    before = field_set(old, model, sub) if old is not None else set()
    changed = {p for p in now if p not in before or value_at(new, p) != value_at(old, p)}
    if old is not None and not changed and now == before:
        new.setdefault("metadata", {})["managedFields"] = _entries(old)
        return new
    entries = []
    mine: set[Path] = set()
    present = field_set(new, model) | field_set(new, model, "status")  # anyone's fields
    for e in _entries(old):
        paths = from_fields_v1(e.get("fieldsV1")) & present
        if _same(e, manager, "Update", sub):
            mine = paths
            continue
        if (e.get("subresource") or "") == sub:
            paths -= changed
        e["fieldsV1"] = to_fields_v1(paths) if paths else {}
        entries.append(e)
    mine = (mine | changed) & now
    if mine:
        entries.append(_entry(manager, "Update", api_version, mine, sub))
    return _store(new, entries)


def apply(
    live: Obj | None,
    applied: Obj,
    manager: str,
    force: bool,
    model: type[BaseModel],
    api_version: str,
    plural: str,
    name: str,
) -> Obj:
    """The object after `manager` applies `applied` (kube's server-side apply)."""
    want = field_set(applied, model)
    entries = _entries(live)
    previous: set[Path] = set()
    others: list[tuple[Obj, set[Path]]] = []
    for e in entries:
        paths = from_fields_v1(e.get("fieldsV1"))
        if _same(e, manager, "Apply", ""):
            previous = paths
        else:
            others.append((e, paths))
    conflicts: list[tuple[Obj, Path]] = []
    if live is not None:
        for e, paths in others:
            if e.get("subresource"):
                continue
            for p in sorted(want & paths):
                if not p[-1].startswith("f:"):
                    continue  # an item or set value: both hold it, nothing to disagree on
                if value_at(applied, p) != value_at(live, p):
                    conflicts.append((e, p))
    if conflicts and not force:
        raise _conflict(conflicts, plural, name)
    taken = {p for _, p in conflicts}
    merged = strategic_merge(copy.deepcopy(live or {}), _without_meta(applied), model)
    owned_by_others = set().union(*(paths - taken for _, paths in others)) if others else set()
    for p in sorted(previous - want - owned_by_others, key=len, reverse=True):
        remove_at(merged, p)
    out: list[Obj] = []
    for e, paths in others:
        e["fieldsV1"] = to_fields_v1(paths - taken) if paths - taken else {}
        out.append(e)
    out.append(_entry(manager, "Apply", api_version, want, ""))
    return _store(merged, out)


def _without_meta(applied: Obj) -> Obj:
    out = dict(applied)
    meta = {k: v for k, v in (applied.get("metadata") or {}).items() if k != "managedFields"}
    out["metadata"] = meta
    return out


def _conflict(conflicts: list[tuple[Obj, Path]], plural: str, name: str) -> errors.APIError:
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f'conflict with "{e.get("manager")}" using {e.get("apiVersion")}',
            "field": _render(p),
        }
        for e, p in conflicts
    ]
    if len(causes) == 1:
        message = f"Apply failed with 1 conflict: {causes[0]['message']}: {causes[0]['field']}"
    else:
        message = f"Apply failed with {len(causes)} conflicts: " + "; ".join(
            f"{c['message']}: {c['field']}" for c in causes
        )
    return errors.APIError(
        409, "Conflict", message, {"name": name, "kind": plural, "causes": causes}
    )
