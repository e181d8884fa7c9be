"""API errors as `metav1.Status`: the code, reason and message kubectl prints.

Messages follow kube-apiserver's wording (`pods "web" not found`), because kubectl
shows them as they are (`Error from server (NotFound): pods "web" not found`).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from corral.api.manifest import _is_union_tag, _loc


class APIError(Exception):
    """An error answered as a Status object with HTTP `code`."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        return status_object(self.code, self.reason, self.message, self.details)


def status_object(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        out["details"] = details
    if not reason:
        del out["reason"]
    return out


def _details(name: str | None, group: str, plural: str, **more: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": plural}
    if name:
        d["name"] = name
    if group:
        d["group"] = group
    d.update(more)
    return d


def _qualified(plural: str, group: str) -> str:
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> APIError:
    return APIError(
        404,
        "NotFound",
        f'{_qualified(plural, group)} "{name}" not found',
        _details(name, group, plural),
    )


def already_exists(plural: str, group: str, name: str) -> APIError:
    return APIError(
        409,
        "AlreadyExists",
        f'{_qualified(plural, group)} "{name}" already exists',
        _details(name, group, plural),
    )


def conflict(plural: str, group: str, name: str) -> APIError:
    return APIError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(plural, group)} "{name}": the object '
        "has been modified; please apply your changes to the latest version and try again",
        _details(name, group, plural),
    )


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


def unauthorized() -> APIError:
    return APIError(401, "Unauthorized", "Unauthorized")


def method_not_allowed(message: str) -> APIError:
    return APIError(405, "MethodNotAllowed", message)


def not_acceptable(message: str) -> APIError:
    return APIError(406, "NotAcceptable", message)


def unsupported_media_type(content_type: str) -> APIError:
    return APIError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - "
        f"accepted media types include: application/json, application/yaml; got {content_type!r}",
    )


def too_large(limit: int) -> APIError:
    return APIError(413, "RequestEntityTooLarge", f"the request is larger than {limit} bytes")


def expired(message: str) -> APIError:
    return APIError(410, "Expired", message)


def unavailable(message: str) -> APIError:
    return APIError(503, "ServiceUnavailable", message)


def not_found_path(path: str) -> APIError:
    return APIError(
        404,
        "NotFound",
        "the server could not find the requested resource",
        {"causes": [{"reason": "UnexpectedServerError", "message": f"404 {path}"}]},
    )


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str]]) -> APIError:
    """422 Invalid; `causes` are (field path, what is wrong), as kube's field errors."""
    summary = ", ".join(f"{f}: {m}" if f else m for f, m in causes)
    qual = f"{kind}.{group}" if group else kind
    return APIError(
        422,
        "Invalid",
        f'{qual} "{name}" is invalid: {summary}',
        {
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [
                {"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes
            ],
        },
    )


def causes_of(e: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as (field path, message) pairs, one per field."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for err in e.errors():
        where = _loc(tuple(p for p in err["loc"] if not _is_union_tag(p)))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "Required value"
        if where in seen:
            continue
        seen.add(where)
        out.append((where, msg))
    return out
