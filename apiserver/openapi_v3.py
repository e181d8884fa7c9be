"""OpenAPI v3, generated from corral's models: what `kubectl explain` reads, and what
tells kubectl the server validates fields itself (`fieldValidation`), so `kubectl
apply`/`create` send `fieldValidation=Strict` instead of validating on the client.

`/openapi/v3` lists one document per group-version (`api/v1`, `apis/apps/v1`, ...),
each with a `serverRelativeURL` carrying a hash of its content, as kube-apiserver's
does. A document holds the kinds of that group-version with everything they refer
to under `components.schemas` (each kind tagged `x-kubernetes-group-version-kind`),
and a path per resource whose operations carry the same tag and the query
parameters the server honours. Descriptions come from the models and
`api/field_docs.py`, the same text `corral explain` prints.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from corral.api.field_docs import describe_field, describe_model
from corral.api.fields import fields, unwrap
from corral.apiserver import registry
from corral.apiserver.registry import Resource

PREFIX = "dev.corral.api."
SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer", "format": "int64"},
    float: {"type": "number", "format": "double"},
    bool: {"type": "boolean"},
}
WRITE_PARAMS = ("dryRun", "fieldManager", "fieldValidation")


def _ref(name: str) -> str:
    return "#/components/schemas/" + name


class _Builder:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def schema(self, ann: Any) -> dict[str, Any]:
        ann = unwrap(ann)
        origin = get_origin(ann)
        args = get_args(ann)
        if origin is list:
            return {"type": "array", "items": self.schema(args[0] if args else Any)}
        if origin is dict:
            value = args[1] if len(args) == 2 else Any
            return {"type": "object", "additionalProperties": self.schema(value)}
        if origin is Literal:
            return {**SCALARS.get(type(args[0]), {"type": "string"}), "enum": list(args)}
        if origin in (Union, types.UnionType):
            members = {a for a in args if a is not type(None)}
            if members == {int, str}:
                return {"x-kubernetes-int-or-string": True}
            return {"anyOf": [self.schema(a) for a in args if a is not type(None)]}
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return {"$ref": _ref(self.define(ann))}
        if isinstance(ann, type) and issubclass(ann, enum.Enum):
            return {"type": "string", "enum": [m.value for m in ann]}
        if ann in SCALARS:
            return dict(SCALARS[ann])
        return {"x-kubernetes-preserve-unknown-fields": True}

    def define(self, model: type[BaseModel]) -> str:
        name = PREFIX + model.__name__
        if name in self.schemas:
            return name
        self.schemas[name] = {}  # taken before the walk: models that contain themselves
        props: dict[str, Any] = {}
        required: list[str] = []
        for wire, _attr, info in fields(model):
            s = self.schema(info.annotation)
            text = describe_field(model, wire, info)
            if "$ref" in s:
                s = {"allOf": [s], "default": {}}
            if text:
                s["description"] = text
            props[wire] = s
            if info.is_required():
                required.append(wire)
        out: dict[str, Any] = {"type": "object", "properties": props}
        text = describe_model(model)
        if text:
            out["description"] = text
        if required:
            out["required"] = required
        self.schemas[name] = out
        return name


def _gvk(r: Resource) -> dict[str, str]:
    return {"group": r.group, "version": r.version, "kind": r.kind}


def _param(name: str, where: str = "query") -> dict[str, Any]:
    return {"name": name, "in": where, "schema": {"type": "string"}, "required": where == "path"}


def _op(r: Resource, action: str, schema: str, params: tuple[str, ...] = ()) -> dict[str, Any]:
    body = {"application/json": {"schema": {"$ref": _ref(schema)}}}
    op: dict[str, Any] = {
        "operationId": f"{action}{r.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(r),
        "parameters": [_param(p) for p in params],
        "responses": {"200": {"description": "OK", "content": body}},
    }
    if action in ("post", "put", "patch"):
        op["requestBody"] = {"content": body}
    return op


def _paths(r: Resource, schema: str) -> dict[str, Any]:
    base = f"/apis/{r.group}/{r.version}" if r.group else f"/api/{r.version}"
    where = f"{base}/namespaces/{{namespace}}/{r.plural}" if r.namespaced else f"{base}/{r.plural}"
    ns = [_param("namespace", "path")] if r.namespaced else []
    collection = {
        "get": _op(r, "list", schema, ("labelSelector", "fieldSelector", "limit", "continue")),
        "post": _op(r, "post", schema, WRITE_PARAMS),
        "parameters": ns,
    }
    item = {
        "get": _op(r, "get", schema),
        "put": _op(r, "put", schema, WRITE_PARAMS),
        "patch": _op(r, "patch", schema, (*WRITE_PARAMS, "force")),
        "delete": _op(r, "delete", schema, ("dryRun", "gracePeriodSeconds", "propagationPolicy")),
        "parameters": [*ns, _param("name", "path")],
    }
    return {where: collection, f"{where}/{{name}}": item}


def _url_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


@functools.cache
def documents() -> dict[str, bytes]:
    """`api/v1`, `apis/apps/v1`, ... -> that group-version's document (JSON)."""
    out: dict[str, bytes] = {}
    for group, versions in registry.groups().items():
        for version in versions:
            b = _Builder()
            paths: dict[str, Any] = {}
            for r in registry.in_group_version(group, version):
                name = b.define(r.model)
                b.schemas[name]["x-kubernetes-group-version-kind"] = [_gvk(r)]
                paths.update(_paths(r, name))
            doc = {
                "openapi": "3.0.0",
                "info": {"title": "corral", "version": version},
                "paths": paths,
                "components": {"schemas": b.schemas},
            }
            out[_url_path(group, version)] = json.dumps(doc, separators=(",", ":")).encode()
    return out


def root() -> dict[str, Any]:
    """`/openapi/v3`: where each group-version's document is, with its content hash."""
    return {
        "paths": {
            path: {
                "serverRelativeURL": f"/openapi/v3/{path}?hash="
                + hashlib.sha512(body).hexdigest()[:128].upper()
            }
            for path, body in documents().items()
        }
    }


def document(path: str) -> bytes | None:
    return documents().get(path)
