"""`labelSelector` and `fieldSelector` query parameters, parsed as kube-apiserver does.

Label selectors take every operator of k8s.io/apimachinery/pkg/labels: `k=v`, `k==v`,
`k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`. Field selectors take `=`, `==` and
`!=` on the field labels a resource declares (registry `field_labels`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from corral.apiserver.errors import bad_request

Requirement = tuple[str, str, tuple[str, ...]]  # key, operator, values
_SET = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_labels(text: str | None) -> list[Requirement]:
    """The requirements of a label selector; BadRequest names the part it cannot read."""
    reqs: list[Requirement] = []
    for part in _split(text or ""):
        if "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append((k.strip(), "!=", (v.strip(),)))
            continue
        if "=" in part:
            k, v = part.replace("==", "=", 1).split("=", 1)
            reqs.append((k.strip(), "=", (v.strip(),)))
            continue
        m = _SET.match(part)
        if not m:
            raise bad_request(f"unable to parse requirement: {part!r} is not a label selector")
        neg, key, op, values = m.groups()
        if op:
            if neg:
                raise bad_request(f"unable to parse requirement: {part!r}")
            reqs.append((key, op, tuple(v.strip() for v in values.split(",") if v.strip())))
        else:
            reqs.append((key, "!" if neg else "exists", ()))
    return reqs


def labels_match(reqs: list[Requirement], labels: Mapping[str, str]) -> bool:
    for key, op, values in reqs:
        present = key in labels
        val = labels.get(key)
        if op == "=" and val != values[0]:
            return False
        if op == "!=" and present and val == values[0]:
            return False
        if op == "in" and (not present or val not in values):
            return False
        if op == "notin" and present and val in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
    return True


FieldReq = tuple[str, bool, str]  # field, equal (False: !=), value


def parse_fields(text: str | None, allowed: tuple[str, ...], plural: str) -> list[FieldReq]:
    out: list[FieldReq] = []
    for part in _split(text or ""):
        if "!=" in part:
            f, v = part.split("!=", 1)
            eq = False
        elif "=" in part:
            f, v = part.replace("==", "=", 1).split("=", 1)
            eq = True
        else:
            raise bad_request(f"invalid field selector: {part!r}: use field=value or field!=value")
        f = f.strip()
        if f not in allowed:
            raise bad_request(
                f"field label not supported: {f} (for {plural}: {', '.join(allowed)})"
            )
        out.append((f, eq, v.strip()))
    return out


def field_value(obj: dict[str, Any], path: str) -> str:
    """A field label's value in an object's wire form ('' when absent; bools lowercase)."""
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def fields_match(reqs: list[FieldReq], obj: dict[str, Any]) -> bool:
    return all((field_value(obj, f) == v) == eq for f, eq, v in reqs)


def matcher(
    label_text: str | None, field_text: str | None, allowed: tuple[str, ...], plural: str
) -> Callable[[dict[str, Any]], bool] | None:
    """One predicate on an object's wire form for both selectors; None: everything."""
    lreqs = parse_labels(label_text)
    freqs = parse_fields(field_text, allowed, plural)
    if not lreqs and not freqs:
        return None

    def match(obj: dict[str, Any]) -> bool:
        md = obj.get("metadata") or {}
        return labels_match(lreqs, md.get("labels") or {}) and fields_match(freqs, obj)

    return match
