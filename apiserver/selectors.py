"""`labelSelector` and `fieldSelector` query parameters, parsed as kube-apiserver does.

Label selectors are api/selectors' (every operator of k8s.io/apimachinery/pkg/labels,
as the CLI's `-l` takes them). Field selectors take `=`, `==` and
`!=` on the field labels a resource declares (registry `field_labels`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from corral.api.selectors import matches_label_selector, parse_selector, split_requirements
from corral.apiserver.errors import bad_request

FieldReq = tuple[str, bool, str]  # field, equal (False: !=), value


def parse_fields(text: str | None, allowed: tuple[str, ...], plural: str) -> list[FieldReq]:
    out: list[FieldReq] = []
    for part in split_requirements(text or ""):
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
    try:
        sel = parse_selector(label_text)
    except ValueError as e:
        raise bad_request(str(e)) from None
    freqs = parse_fields(field_text, allowed, plural)
    if sel is None and not freqs:
        return None

    def match(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return (sel is None or matches_label_selector(sel, labels)) and fields_match(freqs, obj)

    return match
