"""The `corral` command: every `corral.cli.cmd_*` module contributes its verbs."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Collection, Sequence
from typing import NoReturn

import corral.cli
from corral import __version__
from corral.cli.common import CLIError, add_etcd_option
from corral.cli.examples import epilog


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, but an `examples:` epilog keeps its lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """Errors as CLIError, and kubectl's habit: flags and positionals in any order.

    A parser with no sub-verbs parses intermixed (`get svc -n NS NAME`); `--` never
    reaches it, main() splits argv there first (see split_command).
    """

    _intermixing = False

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise CLIError(f"{self.prog}: {message} (see `{self.prog} --help`)", code=2)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or any(
            a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions()
        ):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back in here
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="corral", description="Pod networking for container clusters.")
    p.add_argument("--version", action="version", version=f"corral {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    add_etcd_option(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in sorted(pkgutil.iter_modules(corral.cli.__path__), key=lambda m: m.name):
        if mod.name.startswith("cmd_"):
            module = importlib.import_module(f"corral.cli.{mod.name}")
            module.register(sub)
    _kubectl_habits(sub)
    _examples(p)
    return p


def _examples(parser: argparse.ArgumentParser) -> None:
    """Every parser's help ends with its examples (cli/examples.py, unless it has its own)."""
    parser.formatter_class = _HelpFormatter
    if parser.epilog is None:
        parser.epilog = epilog(parser.prog.removeprefix("corral").strip())
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _examples(child)


def _kubectl_habits(sub: argparse._SubParsersAction) -> None:
    """Let `--etcd`, its TLS files and `-v` follow the verb too (`corral get pods --etcd
    URL`), as kubectl's flags do; and let parse() find the parser of the verb it ran."""
    for parser in set(sub.choices.values()):
        if "--etcd-cafile" not in parser._option_string_actions:
            add_etcd_option(
                parser, suppress=True, url="--etcd" not in parser._option_string_actions
            )
        if "-v" not in parser._option_string_actions:
            parser.add_argument(
                "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging"
            )
        parser.set_defaults(_parser=parser)
        for action in parser._get_positional_actions():
            if action.nargs == argparse.ZERO_OR_MORE and action.default is None:
                # argparse calls a `*` positional without a default required, and
                # intermixed parsing then asks for it (`get` alone: "required: KIND, NAME").
                action.default, action.required = [], False
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _kubectl_habits(action)


def split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split at the first `--`: what is before is corral's, what is after (None if
    there is no `--`) is the command's (`exec`, `run`, `node-exec`) or more NAMEs."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


# Flags every namespaced verb has that kubectl also takes before the verb (`-n NS get pods`).
_NAMESPACE_FLAGS = ("-n", "--namespace")
_ROOT_VALUE_FLAGS = ("--etcd",)


def hoist_namespace(argv: list[str], verbs: Collection[str]) -> list[str]:
    """Move `-n NS` / `--namespace NS` given before the verb to just after it."""
    kept: list[str] = []
    moved: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in verbs:
            return [*kept, word, *moved, *argv[i + 1 :]]
        if word in _NAMESPACE_FLAGS:
            moved += argv[i : i + 2]
            i += 2
        elif word.startswith("--namespace=") or (word.startswith("-n") and len(word) > 2):
            moved.append(word)
            i += 1
        elif word in _ROOT_VALUE_FLAGS:
            kept += argv[i : i + 2]
            i += 2
        elif word.startswith("-"):
            kept.append(word)
            i += 1
        else:
            break  # not a verb: argparse names it
    return [*kept, *argv[i:], *moved]


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv kubectl-style: flags anywhere before `--`, the command after it."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    before, after = split_command(list(argv))
    before = hoist_namespace(before, sub.choices)
    args, extras = parser.parse_known_args(before)
    verb: argparse.ArgumentParser = getattr(args, "_parser", parser)
    takes_command = getattr(args, "takes_command", False)
    if extras:
        hint = ""
        if takes_command and after is None:
            hint = "; the command and its own flags go after `--`"
        verb.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    if after is not None:
        if takes_command:
            args.cmd = [*args.cmd, *after]
        else:
            _more_positionals(verb, args, after)
    return args


def _more_positionals(
    verb: argparse.ArgumentParser, args: argparse.Namespace, words: list[str]
) -> None:
    """`corral get pods -- NAME...`: words after `--` are more NAMEs, as for kubectl."""
    if not words:
        return
    lists = [a for a in verb._get_positional_actions() if a.nargs in (argparse.ZERO_OR_MORE, "+")]
    if not lists:
        verb.error(f"unrecognized arguments: -- {' '.join(words)} (this verb runs no command)")
    dest = lists[-1].dest
    setattr(args, dest, [*(getattr(args, dest, None) or []), *words])


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parse(parser, sys.argv[1:] if argv is None else argv)
        logging.basicConfig(
            level=logging.DEBUG
            if args.verbose > 1
            else logging.INFO
            if args.verbose or getattr(args, "daemon", False)
            else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
