"""Label selectors: the equality maps of v1 objects and apps/v1 LabelSelectors."""

from __future__ import annotations

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


def parse_selector(text: str | None) -> LabelSelector | None:
    """kubectl's `-l` form, `a=b,c!=d,e`, as a LabelSelector; None when `text` is empty.

    `k=v` (or `k==v`) is matchLabels, `k!=v` is NotIn (an absent key matches) and a bare
    `k` is Exists.
    """
    if not text:
        return None
    sel = LabelSelector()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "!=" in part:
            k, v = part.split("!=", 1)
            sel.match_expressions.append(
                LabelSelectorRequirement(key=k.strip(), operator="NotIn", values=[v.strip()])
            )
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            sel.match_labels[k.strip()] = v.strip()
        else:
            sel.match_expressions.append(LabelSelectorRequirement(key=part, operator="Exists"))
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
