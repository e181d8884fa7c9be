"""The object model's fields by their wire (camelCase) names: what `corral explain`
prints and what strategic merge patches walk."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def unwrap(ann: Any) -> Any:
    """`Annotated[X, ...]` -> X, `X | None` -> X (other unions are kept)."""
    while True:
        origin = get_origin(ann)
        if origin is typing.Annotated:
            ann = get_args(ann)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(ann) if a is not type(None)]
            if len(args) == 1:
                ann = args[0]
                continue
        return ann


def model_of(ann: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or as the items of a list (else None)."""
    ann = unwrap(ann)
    if get_origin(ann) is list:
        return model_of(get_args(ann)[0])
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def is_list(ann: Any) -> bool:
    return get_origin(unwrap(ann)) is list


def wire_name(attr: str, info: FieldInfo) -> str:
    return info.alias or attr


def fields(model: type[BaseModel]) -> list[tuple[str, str, FieldInfo]]:
    """(wire name, attribute, info) of each field, in declaration order."""
    return [(wire_name(a, f), a, f) for a, f in model.model_fields.items()]


def field_named(model: type[BaseModel], name: str) -> tuple[str, FieldInfo] | None:
    """(attribute, info) of the field whose wire name (or attribute name) is `name`."""
    for wire, attr, info in fields(model):
        if name in (wire, attr):
            return attr, info
    return None


_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def type_name(ann: Any) -> str:
    """kubectl explain's spelling: string, integer, boolean, []Container,
    map[string]string, Object, or `string|integer` for a union."""
    ann = unwrap(ann)
    origin = get_origin(ann)
    if origin is list:
        return "[]" + type_name(get_args(ann)[0])
    if origin is dict:
        k, v = get_args(ann) or (str, Any)
        return f"map[{type_name(k)}]{type_name(v)}"
    if origin is Literal:
        vals = get_args(ann)
        return type_name(type(vals[0])) if vals else "string"
    if origin in (Union, types.UnionType):
        return "|".join(dict.fromkeys(type_name(a) for a in get_args(ann) if a is not type(None)))
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann.__name__
    if ann in _SCALARS:
        return _SCALARS[ann]
    return "Object"


def choices(ann: Any) -> tuple[Any, ...]:
    """The allowed values of a Literal field (directly or in a list/dict), else ()."""
    ann = unwrap(ann)
    origin = get_origin(ann)
    if origin is Literal:
        return get_args(ann)
    if origin is list:
        return choices(get_args(ann)[0])
    return ()
