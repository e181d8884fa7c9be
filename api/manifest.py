"""Loading Kubernetes-shaped YAML/JSON manifests into typed objects."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import ValidationError

from corral.api.objects import KINDS, TypedObject

# libyaml's parser (PyYAML's C binding) when present: ~3x faster on big manifests.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

KIND_BY_NAME: dict[str, type[TypedObject]] = {k.KIND: k for k in KINDS}


def resolve_kind(word: str) -> type[TypedObject]:
    """A CLI word (`pods`, `svc`, `Service`, `rc`) to its kind; ValueError names the choices."""
    w = word.lower()
    for k in KINDS:
        if w in (k.KIND.lower(), k.PLURAL, *k.SHORT_NAMES):
            return k
    choices = ", ".join(sorted(k.PLURAL for k in KINDS))
    raise ValueError(f"unknown resource type {word!r}; known types: {choices}")


class ManifestError(ValueError):
    """A manifest that cannot be loaded; the message names the document and field."""


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith(("function-", "function_")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(e: ValidationError, what: str) -> str:
    lines = []
    for err in e.errors():
        loc = _loc(tuple(p for p in err["loc"] if not _is_union_tag(p)))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of this kind; check its spelling and indentation)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{what}: {loc}: {msg}" if loc else f"{what}: {msg}")
    # One message per field: unions report each arm; keep the first per location.
    seen: set[str] = set()
    uniq = []
    for line in lines:
        head = line.rsplit(": ", 1)[0]
        if head not in seen:
            seen.add(head)
            uniq.append(line)
    return "\n".join(uniq)


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union arm's type name (e.g. 'int', 'str', 'function-after[...]')
    return isinstance(part, str) and (
        part in ("int", "str", "float", "bool", "constrained-int", "constrained-str")
        or part.startswith(("function-", "literal[", "constrained-"))
    )


def parse_object(doc: Any, source: str = "manifest") -> TypedObject:
    if not isinstance(doc, dict):
        raise ManifestError(
            f"{source}: expected a mapping with apiVersion, kind and metadata, "
            f"got {type(doc).__name__}"
        )
    kind = doc.get("kind")
    if not kind:
        raise ManifestError(f"{source}: kind is missing")
    cls = KIND_BY_NAME.get(kind)
    if cls is None:
        known = ", ".join(sorted(KIND_BY_NAME))
        raise ManifestError(f"{source}: kind {kind!r} is not known; corral serves {known}")
    if "apiVersion" not in doc:
        raise ManifestError(f"{source}: apiVersion is missing (use {cls.API_VERSIONS[0]})")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    what = f"{source}: {kind} {name!r}" if name else f"{source}: {kind}"
    try:
        obj = cls.model_validate(doc)
    except ValidationError as e:
        raise ManifestError(format_validation_error(e, what)) from None
    if not obj.metadata.name and not obj.metadata.generate_name:
        raise ManifestError(f"{what}: metadata.name is required")
    return obj


# etcd refuses requests over 1.5 MiB (its --max-request-bytes default); Kubernetes
# keeps objects under the same bound.
MAX_OBJECT_BYTES = 1024 * 1024


def load_manifests(text: str, source: str = "manifest") -> list[TypedObject]:
    """Every object in a YAML or JSON stream (`---`-separated; `kind: List` expanded)."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestError(f"{source}: not valid YAML{where}: {problem}") from None
    objs: list[TypedObject] = []
    for i, doc in enumerate(docs):
        label = source if len(docs) == 1 else f"{source} (document {i + 1})"
        if isinstance(doc, dict) and doc.get("kind") == "List":
            for j, item in enumerate(doc.get("items") or []):
                objs.append(parse_object(item, f"{label} items[{j}]"))
        else:
            objs.append(parse_object(doc, label))
    if not objs:
        raise ManifestError(f"{source}: no objects found")
    # A document well under the bound as written cannot pass it once stored (defaults
    # add a few hundred bytes): only big ones are measured exactly.
    small_enough = len(text) < MAX_OBJECT_BYTES // 2
    for obj in objs:
        if small_enough:
            break
        size = len(json.dumps(obj.dump(), separators=(",", ":")))
        if size > MAX_OBJECT_BYTES:
            raise ManifestError(
                f"{source}: {obj.KIND} {obj.name!r} is {size} bytes; an object may be at most "
                f"{MAX_OBJECT_BYTES // 1024} KiB (etcd refuses larger requests): move bulk "
                "data out of it"
            )
    return objs


def load_file(path: str) -> list[TypedObject]:
    try:
        if path == "-":
            import sys

            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "manifests are YAML or JSON in UTF-8"
        ) from None
    return load_manifests(text, source=path)
