"""Label selectors: the equality maps of v1 objects and apps/v1 LabelSelectors."""

from __future__ import annotations

import re
from collections.abc import Mapping

from corral.api.objects import LabelSelector, LabelSelectorRequirement


def matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """An equality selector (Service, ReplicationController). Empty or None selects nothing."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def matches_label_selector(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """matchLabels and every matchExpression must hold; an empty selector selects nothing."""
    if not selector.match_labels and not selector.match_expressions:
        return False
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


_SET = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")


def split_requirements(text: str) -> list[str]:
    """A selector's parts: split on commas outside parentheses (`k in (a,b),c`)."""
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


def parse_selector(text: str | None) -> LabelSelector | None:
    """kubectl's `-l` form (also an API `labelSelector`) as a LabelSelector; None when
    `text` is empty. Every operator of k8s.io/apimachinery/pkg/labels: `k=v` (or
    `k==v`) is matchLabels, `k!=v` is NotIn (an absent key matches), `k in (a,b)`,
    `k notin (a,b)`, a bare `k` is Exists and `!k` DoesNotExist. ValueError names the
    part it cannot read.
    """
    sel = LabelSelector()
    for part in split_requirements(text or ""):
        if "!=" in part:
            k, v = part.split("!=", 1)
            sel.match_expressions.append(
                LabelSelectorRequirement(key=k.strip(), operator="NotIn", values=[v.strip()])
            )
            continue
        if "=" in part:
            k, v = (x.strip() for x in part.replace("==", "=", 1).split("=", 1))
            if k in sel.match_labels:  # `a=1,a=2`: both must hold
                sel.match_expressions.append(
                    LabelSelectorRequirement(key=k, operator="In", values=[v])
                )
            else:
                sel.match_labels[k] = v
            continue
        m = _SET.match(part)
        if not m:
            raise ValueError(f"unable to parse requirement: {part!r} is not a label selector")
        neg, key, op, values = m.groups()
        if op and neg:
            raise ValueError(f"unable to parse requirement: {part!r}")
        if op:
            vals = [v.strip() for v in values.split(",") if v.strip()]
            operator = "In" if op == "in" else "NotIn"
            sel.match_expressions.append(
                LabelSelectorRequirement(key=key, operator=operator, values=vals)
            )
        else:
            operator = "DoesNotExist" if neg else "Exists"
            sel.match_expressions.append(LabelSelectorRequirement(key=key, operator=operator))
    if not sel.match_labels and not sel.match_expressions:
        return None
    return sel


def format_selector(selector: Mapping[str, str] | LabelSelector | None) -> str:
    """`a=b,c=d` (plus `key in (x,y)` style expressions), as kubectl prints selectors."""
    if selector is None:
        return "<none>"
    if isinstance(selector, LabelSelector):
        parts = [f"{k}={v}" for k, v in sorted(selector.match_labels.items())]
        for r in selector.match_expressions:
            if r.operator in ("In", "NotIn"):
                parts.append(f"{r.key} {r.operator.lower()} ({','.join(r.values)})")
            else:
                parts.append(r.key if r.operator == "Exists" else f"!{r.key}")
        return ",".join(parts) or "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>"
