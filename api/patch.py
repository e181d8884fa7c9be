"""Patches as `kubectl patch` takes them: JSON merge (RFC 7386), JSON patch (RFC 6902)
and strategic merge, on an object's wire form (a dict).

Strategic merge is a merge patch that knows the object model: lists of named things
are merged item by item on their key, as Kubernetes' `patchMergeKey` does (containers
and env by `name`, container ports by `containerPort`, service ports by `port`,
conditions by `type`, ...); `{"$patch": "delete"}` in such an item removes it,
`{"$patch": "replace"}` in a list or map replaces it whole; other lists are replaced.
The result is validated by the caller (an unknown field is named there).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel

from corral.api.fields import field_named, model_of

# (model, list field) -> the key its items are merged on (wire names throughout).
MERGE_KEYS: dict[tuple[str, str], str] = {
    ("PodSpec", "containers"): "name",
    ("PodSpec", "initContainers"): "name",
    ("Container", "ports"): "containerPort",
    ("Container", "env"): "name",
    ("Container", "volumeMounts"): "mountPath",
    ("PodSpec", "volumes"): "name",
    ("ServiceSpec", "ports"): "port",
    ("NodeSpec", "taints"): "key",
    ("NodeStatus", "conditions"): "type",
    ("NodeStatus", "addresses"): "type",
    ("PodStatus", "conditions"): "type",
    ("PodStatus", "containerStatuses"): "name",
    ("NamespaceStatus", "conditions"): "type",
    ("ObjectMeta", "ownerReferences"): "uid",
}
# Lists of plain values merged as sets (patchStrategy merge on a primitive list).
SET_LISTS = {("ObjectMeta", "finalizers")}


class PatchError(ValueError):
    """A patch that cannot be applied; the message names the path."""


def parse_patch(text: str) -> Any:
    """The patch as JSON (or YAML, which kubectl also takes); PatchError if neither."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PatchError(f"the patch is neither JSON nor YAML: {e}") from None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# ------------------------------------------------------------------ RFC 6902


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"path {path!r}: a JSON pointer starts with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list, token: str, path: str, adding: bool = False) -> int:
    if adding and token == "-":
        return len(container)
    if not token.isdigit():
        raise PatchError(f"path {path!r}: {token!r} is not a list index")
    i = int(token)
    if i > len(container) or (not adding and i == len(container)):
        raise PatchError(
            f"path {path!r}: index {i} is out of range (the list has {len(container)})"
        )
    return i


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, dict):
            if p not in cur:
                raise PatchError(f"path {path!r}: {p!r} does not exist")
            cur = cur[p]
        elif isinstance(cur, list):
            cur = cur[_index(cur, p, path)]
        else:
            raise PatchError(f"path {path!r}: {p!r} is inside a value that is not a map or list")
    return cur


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path {path!r}: {last!r} does not exist")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, path)]
    raise PatchError(f"path {path!r} does not exist")


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise PatchError("path '': cannot remove the whole object")
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path {path!r}: {last!r} does not exist")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, path))
    raise PatchError(f"path {path!r} does not exist")


def _add(doc: Any, path: str, value: Any, replace: bool = False) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"path {path!r}: {last!r} does not exist (use op add)")
        parent[last] = value
    elif isinstance(parent, list):
        if replace:
            parent[_index(parent, last, path)] = value
        else:
            parent.insert(_index(parent, last, path, adding=True), value)
    else:
        raise PatchError(f"path {path!r}: the parent is not a map or list")
    return doc


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902: a list of add/remove/replace/move/copy/test operations, all or none."""
    if not isinstance(ops, list):
        raise PatchError('a JSON patch is a list of operations, e.g. [{"op": "add", ...}]')
    doc = copy.deepcopy(doc)
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"operation {i}: needs 'op' and 'path'")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"operation {i} ({kind} {path}): needs 'value'")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "replace":
            doc = _add(doc, path, copy.deepcopy(op["value"]), replace=True)
        elif kind == "remove":
            _remove(doc, path)
        elif kind in ("move", "copy"):
            if "from" not in op:
                raise PatchError(f"operation {i} ({kind} {path}): needs 'from'")
            value = (
                _remove(doc, op["from"]) if kind == "move" else copy.deepcopy(_get(doc, op["from"]))
            )
            doc = _add(doc, path, value)
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise PatchError(f"operation {i} (test {path}): the value is not {op['value']!r}")
        else:
            raise PatchError(
                f"operation {i}: unknown op {kind!r} (add, remove, replace, move, copy, test)"
            )
    return doc


# ------------------------------------------------------------------ strategic merge


def strategic_merge(target: Any, patch: Any, model: type[BaseModel] | None, path: str = "") -> Any:
    """Merge `patch` into `target` (the wire form of an instance of `model`)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive is not None:
        raise PatchError(f"{path or 'the patch'}: $patch {directive!r} is not allowed on a map")
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        where = f"{path}.{key}" if path else key
        if key.startswith("$"):
            if key.startswith("$setElementOrder/"):
                continue  # order hints: corral keeps the existing order
            raise PatchError(f"{where}: unknown patch directive")
        if value is None:
            out.pop(key, None)
            continue
        found = field_named(model, key) if model is not None else None
        sub = model_of(found[1].annotation) if found else None
        merge_key = MERGE_KEYS.get((model.__name__, key)) if model is not None else None
        current = out.get(key)
        if isinstance(value, list) and merge_key is not None:
            out[key] = _merge_list(
                current if isinstance(current, list) else [], value, merge_key, sub, where
            )
        elif isinstance(value, list) and model is not None and (model.__name__, key) in SET_LISTS:
            base = list(current) if isinstance(current, list) else []
            out[key] = base + [v for v in value if v not in base]
        elif isinstance(value, dict):
            out[key] = strategic_merge(current, value, sub, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(
    current: list, items: list, key: str, model: type[BaseModel] | None, path: str
) -> list:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in items):
        return [copy.deepcopy(i) for i in items if not (isinstance(i, dict) and "$patch" in i)]
    out = [copy.deepcopy(i) for i in current]
    for n, item in enumerate(items):
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"{path}[{n}]: each item needs its merge key {key!r}")
        at = next(
            (i for i, cur in enumerate(out) if isinstance(cur, dict) and cur.get(key) == item[key]),
            None,
        )
        if item.get("$patch") == "delete":
            if at is not None:
                out.pop(at)
            continue
        if at is None:
            out.append(strategic_merge({}, item, model, f"{path}[{n}]"))
        else:
            out[at] = strategic_merge(out[at], item, model, f"{path}[{n}]")
    return out
