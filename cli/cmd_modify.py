"""`corral label`, `annotate`, `patch` and `edit`: changing stored objects, kubectl-style.

All four compute every change and validate it against the object model before the
first write, and write with a compare-and-swap on the resourceVersion they read
(see cli/changes.py): an unknown field, an invalid value or a field that may not
change is named, and nothing is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Any

import yaml

from corral.api.patch import PatchError, json_patch, merge_patch, parse_patch, strategic_merge
from corral.api.store import Conflict
from corral.cli.changes import find_targets, namespace_for, revise, same, split_targets, write_all
from corral.cli.common import CLIError, run, store_from_args
from corral.cli.output import prune


def _target_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("--all", action="store_true", help=f"{what} every object of the kind")
    p.add_argument("-l", "--selector", default=None, help=f"{what} the objects this selects")
    p.add_argument(
        "--resource-version",
        default=None,
        help="only if the object is still at this resourceVersion (one object)",
    )


def register(sub: Any) -> None:
    for verb, field in (("label", "labels"), ("annotate", "annotations")):
        p = sub.add_parser(
            verb,
            help=f"add, change or remove {field} of objects",
            usage=f"corral {verb} KIND NAME... | KIND/NAME... | KIND --all|-l SEL "
            "KEY=VALUE... KEY-... [--overwrite]",
        )
        p.add_argument("words", nargs="*", metavar="KIND NAME... KEY=VALUE KEY-")
        p.add_argument(
            "--overwrite", action="store_true", help=f"allow changing {field} that are set"
        )
        p.add_argument("--list", action="store_true", help=f"print the {field} instead")
        _target_options(p, verb)
        p.set_defaults(func=cmd_label, field=field, verb=verb)

    p = sub.add_parser(
        "patch",
        help="change fields of objects with a merge, JSON or strategic merge patch",
        usage="corral patch KIND NAME... -p PATCH [--type strategic|merge|json]",
    )
    p.add_argument("words", nargs="*", metavar="KIND NAME")
    p.add_argument("-p", "--patch", default=None, help="the patch, JSON or YAML")
    p.add_argument("--patch-file", default=None, metavar="FILE", help="read the patch from FILE")
    p.add_argument(
        "--type",
        choices=["strategic", "merge", "json"],
        default="strategic",
        help="strategic (default: lists of named items merge by key), merge (RFC 7386) "
        "or json (RFC 6902 operations)",
    )
    _target_options(p, "patch")
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser(
        "edit",
        help="edit objects in $KUBE_EDITOR or $EDITOR, then save them (validated first)",
        usage="corral edit KIND NAME... [-n NS] [-o yaml|json]",
    )
    p.add_argument("words", nargs="+", metavar="KIND NAME")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    p.set_defaults(func=cmd_edit)


# ---------------------------------------------------------------- label / annotate


def _split_changes(words: list[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """Targets, KEY=VALUE pairs and KEY- removals, in any order after the kind."""
    targets, sets, removes = [], {}, []
    for w in words:
        if "=" in w:
            k, _, v = w.partition("=")
            if not k:
                raise CLIError(f"{w!r}: the key is empty (use KEY=VALUE)")
            sets[k] = v
        elif w.endswith("-") and len(w) > 1 and targets:
            removes.append(w[:-1])
        else:
            targets.append(w)
    both = set(sets) & set(removes)
    if both:
        raise CLIError(f"{', '.join(sorted(both))}: both set and removed; do one")
    return targets, sets, removes


def cmd_label(args: argparse.Namespace) -> int:
    words, sets, removes = _split_changes(args.words)
    kind, names = split_targets(words)
    ns = namespace_for(kind, args.namespace)
    if not (sets or removes) and not args.list:
        raise CLIError(f"at least one {args.field[:-1]} change is needed: KEY=VALUE or KEY-")
    if args.resource_version and len(names) != 1:
        raise CLIError("--resource-version needs exactly one NAME")
    field = args.field  # labels | annotations

    def change(o: Any) -> dict[str, Any] | None:
        current: dict[str, str] = getattr(o.metadata, field)
        if args.resource_version and o.metadata.resource_version != args.resource_version:
            raise CLIError(
                f"{o.KIND} {o.name!r} is at resourceVersion {o.metadata.resource_version}, "
                f"not {args.resource_version}; nothing was changed"
            )
        if not args.overwrite:
            for k, v in sets.items():
                if k in current and current[k] != v:
                    raise CLIError(
                        f"{o.KIND} {o.name!r}: {field[:-1]} {k!r} already has a value "
                        f"({current[k]}); use --overwrite to change it; nothing was changed"
                    )
        new = {**current, **sets}
        for k in removes:
            new.pop(k, None)
        if new == current:
            return None
        doc = o.dump()
        doc["metadata"][field] = new
        return doc

    async def go() -> list[tuple[Any, bool]] | list[Any]:
        async with store_from_args(args) as store:
            objs = await find_targets(store, kind, names, ns, args.all, args.selector)
            if args.list:
                return objs
            return await write_all(store, objs, change)

    result = run(go)
    if args.list:
        for o in result:
            for k, v in sorted(getattr(o.metadata, field).items()):
                print(f"{k}={v}")
        return 0
    done = {"labels": "labeled", "annotations": "annotated"}[field]
    for o, changed in result:
        verb = done if changed else f"not {done}"
        if changed and removes and not sets and field == "labels":
            verb = "unlabeled"
        print(f"{o.KIND.lower()}/{o.name} {verb}")
    return 0


# ---------------------------------------------------------------- patch


def apply_patch(doc: dict[str, Any], patch: Any, how: str, model: Any) -> dict[str, Any]:
    try:
        if how == "json":
            return json_patch(doc, patch)
        if not isinstance(patch, dict):
            raise PatchError(f"a {how} patch is a map, e.g. '{{\"spec\": {{...}}}}'")
        if how == "merge":
            return merge_patch(doc, patch)
        return strategic_merge(doc, patch, model)
    except PatchError as e:
        raise CLIError(f"the patch cannot be applied: {e}; nothing was changed") from None


def cmd_patch(args: argparse.Namespace) -> int:
    kind, names = split_targets(args.words)
    ns = namespace_for(kind, args.namespace)
    if (args.patch is None) == (args.patch_file is None):
        raise CLIError("give the patch with -p PATCH or --patch-file FILE")
    text = args.patch
    if args.patch_file is not None:
        try:
            with open(args.patch_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CLIError(f"--patch-file {args.patch_file}: {e.strerror}") from None
    try:
        patch = parse_patch(text)
    except PatchError as e:
        raise CLIError(str(e)) from None

    def change(o: Any) -> dict[str, Any] | None:
        if args.resource_version and o.metadata.resource_version != args.resource_version:
            raise CLIError(
                f"{o.KIND} {o.name!r} is at resourceVersion {o.metadata.resource_version}, "
                f"not {args.resource_version}; nothing was changed"
            )
        return apply_patch(o.dump(), patch, args.type, type(o))

    async def go() -> list[tuple[Any, bool]]:
        async with store_from_args(args) as store:
            objs = await find_targets(store, kind, names, ns, args.all, args.selector)
            return await write_all(store, objs, change)

    for o, changed in run(go):
        print(f"{o.KIND.lower()}/{o.name} patched" + ("" if changed else " (no change)"))
    return 0


# ---------------------------------------------------------------- edit

HEADER = """\
# Edit the object{s} below; lines starting with '#' are ignored.
# Saving an empty file cancels the edit. If what you save is not valid, the file
# comes back with the errors here; save it unchanged to give up.
#
"""


def editor_argv() -> list[str]:
    editor = os.environ.get("KUBE_EDITOR") or os.environ.get("EDITOR") or "vi"
    return shlex.split(editor)


def _dump(docs: list[dict[str, Any]], fmt: str) -> str:
    data: Any = docs[0] if len(docs) == 1 else {"apiVersion": "v1", "kind": "List", "items": docs}
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False)


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _parse_edit(text: str, originals: list[Any]) -> list[Any] | None:
    """The edited objects, validated and matched to the originals; None if the file is
    empty. CLIError with every problem otherwise."""
    body = _strip_comments(text)
    if not body.strip():
        return None
    try:
        data = yaml.safe_load(body)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise CLIError(f"not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    docs = data.get("items") if isinstance(data, dict) and data.get("kind") == "List" else [data]
    if not isinstance(docs, list) or len(docs) != len(originals):
        raise CLIError(f"the file must hold the {len(originals)} object(s) it was opened with")
    return [revise(o, copy.deepcopy(d)) for o, d in zip(originals, docs, strict=True)]


def cmd_edit(args: argparse.Namespace) -> int:
    kind, names = split_targets(args.words)
    ns = namespace_for(kind, args.namespace)
    if not names:
        raise CLIError(f"name the {kind.PLURAL} to edit: corral edit {kind.PLURAL} NAME")

    async def fetch() -> list[Any]:
        async with store_from_args(args) as store:
            return await find_targets(store, kind, names, ns)

    originals = run(fetch)
    text = _dump([prune(o.dump()) for o in originals], args.output)  # type: ignore[misc]
    suffix = ".json" if args.output == "json" else ".yaml"
    fd, path = tempfile.mkstemp(prefix="corral-edit-", suffix=suffix)
    os.close(fd)
    header = HEADER.format(s="s" if len(originals) > 1 else "")
    content = header + text
    last_body: str | None = None
    last_error = ""
    while True:
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        try:
            rc = subprocess.call([*editor_argv(), path])
        except FileNotFoundError:
            os.unlink(path)
            raise CLIError(
                f"editor {editor_argv()[0]!r} not found; set KUBE_EDITOR or EDITOR"
            ) from None
        if rc != 0:
            os.unlink(path)
            raise CLIError(f"the editor exited with status {rc}; nothing was changed")
        with open(path, encoding="utf-8") as f:
            edited = f.read()
        body = _strip_comments(edited)
        if last_body is not None and body == last_body:
            print(f"error: {last_error}", file=sys.stderr)
            print(f"A copy of your changes is in {path}; nothing was changed", file=sys.stderr)
            return 1
        try:
            news = _parse_edit(edited, originals)
        except CLIError as e:
            last_error, last_body = str(e), body
            errs = "".join(f"# {line}\n" for line in str(e).splitlines())
            content = header + "# The edit could not be saved:\n" + errs + "#\n" + body.lstrip("\n")
            if not content.endswith("\n"):
                content += "\n"
            continue
        break
    if news is None or all(same(o, n) for o, n in zip(originals, news, strict=True)):
        os.unlink(path)
        print("Edit cancelled, no changes made.")
        return 0

    edited_by_key = {(n.namespace, n.name): n.dump() for n in news}

    async def save() -> list[Any]:
        async with store_from_args(args) as store:
            return await write_all(
                store,
                originals,
                lambda o: edited_by_key[(o.namespace, o.name)],
                retry_on_conflict=False,
            )

    try:
        written = run(save)
    except Conflict:
        raise CLIError(
            f"{kind.KIND} changed in etcd while you were editing; nothing was saved. Your "
            f"version is in {path}: run `corral edit` again and make your change there"
        ) from None
    except CLIError as e:
        raise CLIError(f"{e}\nA copy of your changes is in {path}") from None
    os.unlink(path)
    for o, changed in written:
        print(f"{o.KIND.lower()}/{o.name} " + ("edited" if changed else "unchanged"))
    return 0
