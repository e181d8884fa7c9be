"""corral's own installation, mounted read-only into corral's system pods.

A container without an image sees the node's files, minus the paths every pod has
hidden (runtime/security.py: `/root`, `/home`, the node's state) and with private
`/tmp`, `/var/tmp` and `/run`. corral's system pods (the cluster DNS) run
`<venv>/bin/python3 -m corral`, so a corral checked out under one of those (a clone
in `/root/corral` or `/tmp/x`) would be out of their sight. A pod of
`corral-system` annotated `corral.dev/mount-corral: "true"` gets exactly the
directories of the node runtime's own installation that it could not otherwise see,
at the same paths, read-only, nosuid and nodev (not noexec: the interpreter maps its
extension modules executable): the venv (`sys.prefix`), the base interpreter's
prefix, and the package folders of an editable install (each `corral.<pkg>`'s
folder, as the installed finder resolves it). Nothing else of the checkout or of the
hidden directories around it. A pod elsewhere that asks fails to start; a privileged
container sees the node's files anyway and an image container has its own, so
neither gets a mount.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Iterable, Sequence

from corral.api.objects import Pod
from corral.runtime.credentials import SYSTEM_NAMESPACES
from corral.runtime.security import PRIVATE_DIRS, Security

ANNOTATION = "corral.dev/mount-corral"


class CorralFilesError(ValueError):
    """The pod may not have corral's files, or they cannot be given without more."""


def wanted(pod: Pod) -> bool:
    v = pod.metadata.annotations.get(ANNOTATION, "").strip().lower()
    if v in ("", "false"):
        return False
    if v != "true":
        raise CorralFilesError(f'annotation {ANNOTATION}: {v!r} is neither "true" nor "false"')
    return True


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def package_dirs() -> list[str]:
    """The folders corral's packages are imported from: `corral` itself and each
    `corral.<pkg>` the import system finds, named by the folders beside `corral/`
    (an editable install maps top-level folders to `corral.*`) or inside it."""
    import corral

    roots = [os.path.abspath(p) for p in corral.__path__]
    names: set[str] = set()
    for r in roots:
        names |= {m.name for m in pkgutil.iter_modules([r]) if m.ispkg}
        parent = os.path.dirname(r)
        try:
            entries = os.listdir(parent)
        except OSError:
            continue
        names |= {n for n in entries if n.isidentifier() and os.path.isdir(f"{parent}/{n}")}
    dirs = set(roots)
    for n in sorted(names):
        try:
            spec = importlib.util.find_spec(f"corral.{n}")
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs |= {os.path.abspath(p) for p in spec.submodule_search_locations}
    return sorted(dirs)


@functools.cache
def installation() -> tuple[str, ...]:
    """Every directory this corral runs from: venv, base interpreter, package folders
    (absolute, as written and resolved: a pod follows the same symlinks)."""
    out: set[str] = set()
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *package_dirs()):
        out |= {os.path.abspath(p), os.path.realpath(p)}
    return tuple(sorted(out))


def mounts(
    pod: Pod, sec: Security, hidden: Sequence[str], image: bool = False
) -> list[tuple[str, str]]:
    """(node directory, container path) for what of corral's installation the pod
    asks for and cannot see; [] unless it asks. `hidden`: the node's hidden paths."""
    if not wanted(pod):
        return []
    if pod.namespace not in SYSTEM_NAMESPACES:
        raise CorralFilesError(
            f"annotation {ANNOTATION}: only pods in {', '.join(SYSTEM_NAMESPACES)} may have "
            f"corral's files mounted, not pods in {pod.namespace!r}"
        )
    if sec.privileged or image:
        return []
    return plan(installation(), hidden)


def plan(paths: Iterable[str], hidden: Sequence[str]) -> list[tuple[str, str]]:
    """The mounts that make `paths` visible in a container hiding `hidden` (and with
    private /tmp, /var/tmp, /run): outermost only, never one with hidden state inside."""
    covered = [*hidden, *PRIVATE_DIRS]
    want = sorted({p for p in paths if _under(p, covered)})
    out: list[tuple[str, str]] = []
    for dst in want:
        if any(_under(dst, [d]) for _, d in out):
            continue
        src = os.path.realpath(dst)
        if not os.path.isdir(src):
            continue  # a prefix that does not exist (nothing to run from there)
        inner = [h for h in hidden if _under(h, [dst, src])]
        if inner:
            raise CorralFilesError(
                f"corral's installation at {dst} holds {inner[0]}, which pods must not see: "
                "install corral elsewhere, or keep the node's state out of it"
            )
        out.append((src, dst))
    return out
