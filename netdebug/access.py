"""How `corral net` reaches a node: its daemons' debug sockets, and a way to run a command.

Three ways, one interface (`NodeAccess`):

- the local cluster (`corral up`): a node's `/run/corral` is a bind mount of
  `<state>/nodes/<node>/run`, so the CLI connects to the node's sockets at that
  host path directly (a unix socket is found by inode, whichever mount namespace
  names it), and runs commands with `nsenter -t <holder> -m -n` (what `corral
  node-exec` does). The CLI side that reads the cluster's state lives in
  `corral.cli.cmd_net` (production code does not import the dev cluster).
- this machine is the node (`--node $(hostname)` on a real node, or
  `CORRAL_NODE`): `/run/corral/*.sock` and plain commands.
- any other machine: `--via 'ssh root@{ip}'` (or `CORRAL_NET_VIA`), a command
  template that runs a command on the node (`{node}`, `{ip}` filled in; the
  command's words follow it, shell-quoted, as ssh expects); the sockets are read
  by running `python3 -m corral.daemon.debug SOCKET` there (`--node-python` or
  `CORRAL_NET_PYTHON` names another interpreter, e.g. a venv's).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.daemon import debug

SOCKETS = {"node": "debug.sock", "proxy": "proxy-debug.sock"}
NODE_RUN_DIR = "/run/corral"


class NodeUnreachable(RuntimeError):
    """A node (or one of its daemons) does not answer; the message says which and why."""


@dataclass
class NodeAccess:
    name: str
    ip: str | None = None
    run_dir: str | None = None  # host path of the node's /run/corral (None: via `prefix`)
    prefix: list[str] = field(default_factory=list)  # argv prefix running a command there
    python: str = "python3"  # the node's interpreter with corral importable
    how: str = "this machine"  # for messages: how we reach it
    netns_dir: str | None = None  # host path of the node's /run/netns (local cluster)
    paste: str = ""  # what an operator types before a command to run it there

    def query(self, daemon: str, request: str = "state", timeout: float = 5.0) -> dict[str, Any]:
        sock = SOCKETS[daemon]
        if self.run_dir is not None:
            path = os.path.join(self.run_dir, sock)
            try:
                doc = debug.query(path, timeout=timeout, request=request)
            except FileNotFoundError:
                raise NodeUnreachable(
                    f"{self.name}: no {daemon} debug socket at {path} (is `corral {daemon}` "
                    "running there?)"
                ) from None
            except OSError as e:
                raise NodeUnreachable(
                    f"{self.name}: the {daemon} daemon does not answer on {path}: {e.strerror or e}"
                ) from None
            except ValueError as e:
                raise NodeUnreachable(f"{self.name}: {daemon} answered garbage: {e}") from None
        else:
            argv = [
                self.python,
                "-m",
                "corral.daemon.debug",
                os.path.join(NODE_RUN_DIR, sock),
                request,
            ]
            p = self.run(argv, timeout=timeout + 55)  # a remote login and a Python start
            try:
                doc = json.loads(p.stdout)
            except ValueError:
                why = (p.stdout + p.stderr).strip().splitlines()
                raise NodeUnreachable(
                    f"{self.name} ({self.how}): cannot read the {daemon} debug socket: "
                    f"{why[-1] if why else f'exit {p.returncode}'}"
                ) from None
        if isinstance(doc, dict) and doc.get("error") and len(doc) == 1:
            raise NodeUnreachable(f"{self.name}: {daemon} debug socket: {doc['error']}")
        return doc

    def argv(self, argv: Sequence[str]) -> list[str]:
        if not self.prefix:
            return list(argv)
        if self.run_dir is None:  # through --via: ssh hands its words to a shell there
            return [*self.prefix, *(shlex.quote(a) for a in argv)]
        return [*self.prefix, *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess:
        full = self.argv(argv)
        try:
            return subprocess.run(
                full,
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except FileNotFoundError as e:
            raise NodeUnreachable(f"{self.name}: cannot run {full[0]}: {e.strerror}") from None
        except subprocess.TimeoutExpired:
            raise NodeUnreachable(
                f"{self.name} ({self.how}): `{shlex.join(argv)}` took over {timeout:.0f}s"
            ) from None

    def popen(self, argv: Sequence[str]) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def shown(self, argv: Sequence[str] | str) -> str:
        """How an operator runs a repair command on this node, as text to paste."""
        cmd = argv if isinstance(argv, str) else shlex.join(argv)
        return f"{self.paste} {cmd}" if self.paste else cmd


def via(name: str, ip: str | None, template: str, python: str = "python3") -> NodeAccess:
    """A node reached by running commands through `template` (e.g. `ssh root@{ip}`)."""
    try:
        prefix = shlex.split(template.format(node=name, ip=ip or name))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"--via {template!r}: {e}; use {{node}} and {{ip}} only, as in 'ssh root@{{ip}}'"
        ) from None
    return NodeAccess(
        name, ip, None, prefix, python, how=f"via {' '.join(prefix)}", paste=shlex.join(prefix)
    )


def this_machine(name: str, ip: str | None = None, python: str = "python3") -> NodeAccess:
    import sys

    return NodeAccess(name, ip, NODE_RUN_DIR, [], sys.executable or python, how="this machine")
