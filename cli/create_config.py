"""`corral create configmap|secret ...`: kubectl's generators for ConfigMaps and
Secrets (--from-literal, --from-file, secret generic|tls|docker-registry)."""

from __future__ import annotations

import argparse
import base64
import json
import os

from pydantic import ValidationError

from corral.api.manifest import format_validation_error
from corral.api.objects import ConfigMap, Secret, TypedObject
from corral.cli.common import CLIError

USAGE = (
    "corral create configmap NAME [--from-literal K=V]... [--from-file [K=]PATH]... | "
    "corral create secret generic NAME [--type T] [--from-literal K=V]... "
    "[--from-file [K=]PATH]... | "
    "corral create secret tls NAME --cert FILE --key FILE | "
    "corral create secret docker-registry NAME --docker-server S --docker-username U "
    "--docker-password P [--docker-email E]"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-literal", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--from-file", action="append", default=[], metavar="[KEY=]PATH")
    p.add_argument("--type", dest="secret_type", help="a generic secret's type (default Opaque)")
    p.add_argument("--cert", help="tls secret: the PEM certificate file")
    p.add_argument("--key", help="tls secret: the PEM private key file")
    for f in ("server", "username", "password", "email"):
        p.add_argument(f"--docker-{f}", help=f"docker-registry secret: the registry {f}")


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot read it: {e.strerror}") from None


def _entries(args: argparse.Namespace) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for lit in args.from_literal:
        k, sep, v = lit.partition("=")
        if not sep or not k:
            raise CLIError(f"--from-literal {lit!r}: give KEY=VALUE")
        out[k] = v.encode()
    for spec in args.from_file:
        k, sep, path = spec.partition("=")
        if not sep:
            k, path = os.path.basename(spec.rstrip("/")), spec
        if os.path.isdir(path):  # every regular file in it, as kubectl does
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if os.path.isfile(full):
                    out[name] = _read(full, "--from-file")
            continue
        out[k] = _read(path, "--from-file")
    return out


def build(what: list[str], args: argparse.Namespace) -> TypedObject:
    """The ConfigMap or Secret `what` (["configmap", NAME] or ["secret", TYPE, NAME])."""
    ns = args.namespace or "default"
    try:
        if what[0] in ("configmap", "configmaps", "cm") and len(what) == 2:
            data, binary = {}, {}
            for k, v in _entries(args).items():
                try:
                    data[k] = v.decode()
                except UnicodeDecodeError:
                    binary[k] = base64.b64encode(v).decode()
            return ConfigMap.model_validate(
                {
                    "metadata": {"name": what[1], "namespace": ns},
                    "data": data,
                    "binaryData": binary,
                }
            )
        if what[0] in ("secret", "secrets") and len(what) == 3:
            kind, name = what[1], what[2]
            if kind == "generic":
                entries, type_ = _entries(args), args.secret_type or "Opaque"
            elif kind == "tls":
                if not args.cert or not args.key:
                    raise CLIError("create secret tls needs --cert FILE and --key FILE")
                entries = {
                    "tls.crt": _read(args.cert, "--cert"),
                    "tls.key": _read(args.key, "--key"),
                }
                type_ = "kubernetes.io/tls"
            elif kind == "docker-registry":
                if not (args.docker_server and args.docker_username and args.docker_password):
                    raise CLIError(
                        "create secret docker-registry needs --docker-server, "
                        "--docker-username and --docker-password"
                    )
                user, pw = args.docker_username, args.docker_password
                auth = {
                    "username": user,
                    "password": pw,
                    "auth": base64.b64encode(f"{user}:{pw}".encode()).decode(),
                }
                if args.docker_email:
                    auth["email"] = args.docker_email
                doc = {"auths": {args.docker_server: auth}}
                entries = {".dockerconfigjson": json.dumps(doc).encode()}
                type_ = "kubernetes.io/dockerconfigjson"
            else:
                raise CLIError(f"unknown secret type {kind!r}: use generic, tls or docker-registry")
            return Secret.model_validate(
                {
                    "metadata": {"name": name, "namespace": ns},
                    "type": type_,
                    "data": {k: base64.b64encode(v).decode() for k, v in entries.items()},
                }
            )
    except ValidationError as e:
        raise CLIError(format_validation_error(e, f"{what[0]} {what[-1]!r}")) from None
    raise CLIError(f"usage: {USAGE}")
