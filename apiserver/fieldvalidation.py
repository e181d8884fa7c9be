"""`fieldValidation`: what a write does with fields the kind does not have.

As kube-apiserver: `Strict` refuses the request (400, `strict decoding error: unknown
field "spec.foo"`), `Warn` (the default) drops each unknown field and says so in a
`Warning: 299` response header, `Ignore` drops them silently. A wrong value of a known
field is `422 Invalid` in every mode. The mode and the warnings of one request live in
a context variable the server sets per request, so the storage layer needs no extra
parameters.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from corral.api.manifest import _is_union_tag, _loc
from corral.apiserver import errors

MODES = ("Strict", "Warn", "Ignore")


@dataclass
class Scope:
    mode: str = "Warn"
    warnings: list[str] = field(default_factory=list)
    manager: str = "unknown"  # who writes (managedFields): fieldManager, else the client
    explicit_manager: bool = False  # fieldManager given (server-side apply needs it)


def manager() -> str:
    scope = SCOPE.get(None)
    return scope.manager if scope is not None else "unknown"


SCOPE: contextvars.ContextVar[Scope] = contextvars.ContextVar("field_validation")


def begin(mode: str | None, field_manager: str | None = None, user_agent: str = "") -> Scope:
    """The scope of one request; a bad `fieldValidation` value is 400. The field manager
    is `fieldManager`, else the client program of the User-Agent (kube's default)."""
    mode = mode or "Warn"
    if mode not in MODES:
        raise errors.bad_request(f"fieldValidation={mode!r}: use one of {', '.join(MODES)}")
    if field_manager is not None and not 0 < len(field_manager) <= 128:
        raise errors.bad_request("fieldManager must be 1 to 128 characters")
    agent = user_agent.split("/", 1)[0].strip()
    scope = Scope(mode, manager=field_manager or agent or "unknown")
    scope.explicit_manager = bool(field_manager)
    SCOPE.set(scope)
    return scope


def warn(message: str) -> None:
    scope = SCOPE.get(None)
    if scope is not None and message not in scope.warnings:
        scope.warnings.append(message)


def header_values(scope: Scope) -> list[str]:
    """RFC 7234 warn-code 299, agent "-", the text quoted (what client-go prints)."""
    return ['299 - "' + w.replace("\\", "\\\\").replace('"', '\\"') + '"' for w in scope.warnings]


def _drop(doc: Any, loc: tuple[Any, ...]) -> bool:
    """Remove the field at `loc` (input keys and list indices) from `doc`."""
    node = doc
    for step in loc[:-1]:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and loc and loc[-1] in node:
        del node[loc[-1]]
        return True
    return False


def validate(model: type, doc: dict[str, Any], invalid: Any) -> Any:
    """`model.model_validate(doc)` under the request's mode: unknown fields refused,
    dropped with a warning, or dropped; `invalid(ValidationError)` raises the 422."""
    scope = SCOPE.get(None) or Scope("Strict")
    for _ in range(8):  # an unknown field may hide others below it in another branch
        try:
            return model.model_validate(doc)
        except ValidationError as e:
            unknown = [err for err in e.errors() if err["type"] == "extra_forbidden"]
            if not unknown:
                invalid(e)
            locs = [tuple(p for p in err["loc"] if not _is_union_tag(p)) for err in unknown]
            paths = [_loc(loc) for loc in locs]
            if scope.mode == "Strict":
                raise errors.bad_request(
                    "strict decoding error: "
                    + ", ".join(f'unknown field "{p}"' for p in dict.fromkeys(paths))
                ) from None
            for loc, path in zip(locs, paths, strict=True):
                if not _drop(doc, loc):
                    invalid(e)
                if scope.mode == "Warn":
                    warn(f'unknown field "{path}"')
    raise errors.bad_request("too many unknown fields")
