"""The `corral` command: every `corral.cli.cmd_*` module contributes its verbs."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import corral.cli
from corral import __version__
from corral.cli.common import CLIError, add_etcd_option


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise CLIError(f"{self.prog}: {message} (see `{self.prog} --help`)", code=2)


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
    _etcd_everywhere(sub)
    return p


def _etcd_everywhere(sub: argparse._SubParsersAction) -> None:
    """Let `--etcd` and its TLS files follow the verb too (`corral get pods --etcd URL`), as
    kubectl's flags do."""
    for parser in set(sub.choices.values()):
        if "--etcd-cafile" not in parser._option_string_actions:
            add_etcd_option(
                parser, suppress=True, url="--etcd" not in parser._option_string_actions
            )
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _etcd_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
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
