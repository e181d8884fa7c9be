"""`corral completion bash|zsh`: a shell completion script, made from the parser itself.

It completes verbs (and `network show|set`, `node remove`), each verb's flags, the
choices of flags that have them (`-o json|yaml|...`), kinds where a verb takes
one, and names of live objects (pods for logs/exec, the kind's objects after it,
namespaces after -n) by asking `corral get KIND -o name`. zsh uses the same
function through bashcompinit.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from corral.api.objects import KINDS

# Verbs whose first argument is a kind, and those whose first argument is a pod.
KIND_VERBS = ("get", "delete", "describe", "label", "annotate", "patch", "edit", "explain")
POD_VERBS = ("logs", "exec")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        usage="corral completion bash|zsh",
    )
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=cmd_completion)


def _walk(
    parser: argparse.ArgumentParser, path: str, out: dict[str, argparse.ArgumentParser]
) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                key = f"{path} {name}".strip()
                out.setdefault(key, child)
                _walk(child, key, out)


def _ident(verb: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in verb)


def bash_script(parser: argparse.ArgumentParser) -> str:
    verbs: dict[str, argparse.ArgumentParser] = {}
    _walk(parser, "", verbs)
    top = sorted(v for v in verbs if " " not in v)
    kinds = sorted({w for k in KINDS for w in (k.PLURAL, *k.SHORT_NAMES)})
    value_flags: set[str] = set()
    lines = [
        "# corral completion for bash (and zsh through bashcompinit); made by",
        "# `corral completion bash`. Load it with: source <(corral completion bash)",
        f"_corral_verbs={shlex.quote(' '.join(top))}",
        f"_corral_kinds={shlex.quote(' '.join(kinds))}",
    ]
    cases = []
    subverbs = []
    for verb, p in sorted(verbs.items()):
        flags = sorted(
            o for a in p._actions for o in a.option_strings if a.help != argparse.SUPPRESS
        )
        lines.append(f"_corral_flags_{_ident(verb)}={shlex.quote(' '.join(flags))}")
        for a in p._actions:
            if a.option_strings and a.nargs != 0:
                value_flags.update(a.option_strings)
                if a.choices:
                    pats = "|".join(f'"{verb}:{o}"' for o in a.option_strings)
                    cases.append(
                        f"    {pats}) _corral_words={shlex.quote(' '.join(map(str, a.choices)))} ;;"
                    )
        children = sorted(
            k.split(" ", 1)[1]
            for k in verbs
            if k.startswith(verb + " ") and k.count(" ") == verb.count(" ") + 1
        )
        if children:
            subverbs.append(f"    {verb}) _corral_words={shlex.quote(' '.join(children))} ;;")
    lines.append(f"_corral_value_flags={shlex.quote(' ' + ' '.join(sorted(value_flags)) + ' ')}")
    lines += [
        "",
        "_corral_names() {  # the names of live objects of kind $1 (in namespace $2)",
        "    local ns=()",
        '    [[ -n "$2" ]] && ns=(-n "$2")',
        '    corral get "$1" "${ns[@]}" -o name 2>/dev/null | sed "s|^[^/]*/||"',
        "}",
        "",
        "_corral() {",
        "    [[ -n ${ZSH_VERSION-} ]] && emulate -L ksh  # 0-based arrays, word splitting",
        "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}",
        "    local verb='' ns='' i w _corral_words='' args=()",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        w=${COMP_WORDS[i]}",
        "        if [[ $w == -- ]]; then return 0; fi",
        "        if [[ $w == -n || $w == --namespace ]]; then ns=${COMP_WORDS[i+1]}; fi",
        "        if [[ $w == -* ]]; then",
        '            [[ $w != *=* && $_corral_value_flags == *" $w "* ]] && ((i++))',
        "            continue",
        "        fi",
        '        if [[ -z $verb ]]; then verb=$w; else args+=("$w"); fi',
        "    done",
        "    if [[ -z $verb ]]; then",
        '        COMPREPLY=($(compgen -W "$_corral_verbs" -- "$cur")); return 0',
        "    fi",
        '    case "$verb" in',
        *subverbs,
        "    esac",
        "    if [[ -n $_corral_words && ${#args[@]} -eq 0 ]]; then",
        "        if [[ $cur != -* ]]; then",
        '            COMPREPLY=($(compgen -W "$_corral_words" -- "$cur")); return 0',
        "        fi",
        "    fi",
        "    if [[ -n $_corral_words && ${#args[@]} -ge 1 ]]; then",
        '        verb="$verb ${args[0]}"; args=("${args[@]:1}")',
        "    fi",
        "    _corral_words=''",
        '    case "$verb:$prev" in',
        *cases,
        "    esac",
        "    if [[ -n $_corral_words ]]; then",
        '        COMPREPLY=($(compgen -W "$_corral_words" -- "$cur")); return 0',
        "    fi",
        "    if [[ $prev == -n || $prev == --namespace ]]; then",
        '        COMPREPLY=($(compgen -W "$(_corral_names namespaces)" -- "$cur")); return 0',
        "    fi",
        "    if [[ $cur == -* ]]; then",
        "        local v=_corral_flags_${verb//[^a-zA-Z0-9]/_}",
        r'        eval "local flags=\$$v"  # what ${!v} is in bash, in words zsh reads too',
        '        COMPREPLY=($(compgen -W "$flags" -- "$cur")); return 0',
        "    fi",
        '    case "$verb" in',
        f"        {'|'.join(KIND_VERBS)})",
        "            if [[ ${#args[@]} -eq 0 ]]; then",
        '                COMPREPLY=($(compgen -W "$_corral_kinds" -- "$cur"))',
        "            elif [[ $verb != explain ]]; then",
        '                COMPREPLY=($(compgen -W "$(_corral_names "${args[0]}" "$ns")" -- "$cur"))',
        "            fi ;;",
        f"        {'|'.join(POD_VERBS)})",
        "            [[ ${#args[@]} -eq 0 ]] &&",
        '                COMPREPLY=($(compgen -W "$(_corral_names pods "$ns")" -- "$cur")) ;;',
        "        completion) COMPREPLY=($(compgen -W 'bash zsh' -- \"$cur\")) ;;",
        "    esac",
        "    return 0",
        "}",
        "complete -F _corral corral",
        "",
    ]
    return "\n".join(lines)


def zsh_script(parser: argparse.ArgumentParser) -> str:
    return (
        "#compdef corral\n"
        "# corral completion for zsh, through bashcompinit; made by `corral completion zsh`.\n"
        "# Load it with: source <(corral completion zsh)\n"
        "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit -i; }\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser)
    )


def cmd_completion(args: argparse.Namespace) -> int:
    from corral.cli.main import build_parser

    parser = build_parser()
    print(bash_script(parser) if args.shell == "bash" else zsh_script(parser), end="")
    return 0
