"""`corral explain KIND[.FIELD...]`: the object model's fields, their types and docs."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from pydantic import BaseModel

from corral.api.field_docs import describe_field, describe_model
from corral.api.fields import choices, field_named, fields, model_of, type_name
from corral.api.manifest import resolve_kind
from corral.cli.common import CLIError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help="describe a kind or one of its fields: type, meaning, the fields inside",
        usage="corral explain KIND[.FIELD[.FIELD...]] [--recursive]",
    )
    p.add_argument("path", metavar="KIND[.FIELD...]")
    p.add_argument("--recursive", action="store_true", help="every field below, as a tree")
    p.set_defaults(func=cmd_explain)


def _wrap(text: str, indent: int) -> str:
    return textwrap.fill(text, 80, initial_indent=" " * indent, subsequent_indent=" " * indent)


def _flags(info: Any) -> str:
    out = " -required-" if info.is_required() else ""
    vals = choices(info.annotation)
    if vals:
        out += f" ({', '.join(map(str, vals))})"
    return out


def _fields_block(model: type[BaseModel]) -> list[str]:
    lines = []
    width = max((len(w) for w, _, _ in fields(model)), default=0) + 2
    for wire, _attr, info in fields(model):
        lines.append(f"  {wire.ljust(width)}<{type_name(info.annotation)}>{_flags(info)}")
        text = describe_field(model, wire, info)
        if text:
            lines.append(_wrap(text, 4))
        lines.append("")
    return lines


def _tree(model: type[BaseModel], depth: int, seen: tuple[type, ...]) -> list[str]:
    lines = []
    for wire, _attr, info in fields(model):
        lines.append(f"{'  ' * depth}{wire}\t<{type_name(info.annotation)}>{_flags(info)}")
        sub = model_of(info.annotation)
        if sub is not None and sub not in seen:
            lines += _tree(sub, depth + 1, (*seen, sub))
    return lines


def explain(path: str, recursive: bool = False) -> str:
    word, *parts = path.split(".")
    try:
        kind = resolve_kind(word)
    except ValueError as e:
        raise CLIError(str(e)) from None
    model: type[BaseModel] = kind
    field_line = ""
    description = describe_model(kind)
    walked = kind.KIND
    for part in parts:
        found = field_named(model, part)
        if found is None:
            names = ", ".join(w for w, _, _ in fields(model))
            raise CLIError(f"field {part!r} does not exist in {walked} (its fields: {names})")
        _attr, info = found
        field_line = f"FIELD:    {part} <{type_name(info.annotation)}>{_flags(info)}"
        description = describe_field(model, part, info)
        sub = model_of(info.annotation)
        walked += f".{part}"
        if sub is None:
            if part is not parts[-1]:
                raise CLIError(f"{walked} is a {type_name(info.annotation)}: it has no fields")
            model = None  # type: ignore[assignment]
            break
        model = sub
        description = description or describe_model(sub)
    out = [f"KIND:     {kind.KIND}", f"VERSION:  {kind.API_VERSIONS[0]}", ""]
    if field_line:
        out += [field_line, ""]
    out += ["DESCRIPTION:", _wrap(description or "<empty>", 4), ""]
    if model is not None:
        out.append("FIELDS:")
        out += _tree(model, 1, (model,)) if recursive else _fields_block(model)
    if recursive and model is not None:
        width = max(len(line.split("\t")[0]) for line in out if "\t" in line) + 2
        out = [_pad(line, width) for line in out]
    return "\n".join(out).rstrip() + "\n"


def _pad(line: str, width: int) -> str:
    name, tab, rest = line.partition("\t")
    return f"{name.ljust(width)}{rest}" if tab else line


def cmd_explain(args: argparse.Namespace) -> int:
    print(explain(args.path, args.recursive), end="")
    return 0
