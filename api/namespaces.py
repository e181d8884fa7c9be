"""Namespaces as objects: the built-in ones, and the check that refuses objects in a
namespace that does not exist (or is being deleted).

The check is what the API server's NamespaceLifecycle admission does, for the
writes users make (`corral apply`, `create`, `run`, `expose`): the CLI calls
`check_namespaces` before it writes. The daemons' own writes are not checked:
they only write objects that follow from ones already admitted (the pods of a
ReplicationController, the endpoints of a Service), and the namespace controller
(`control/namespaces.py`) deletes whatever is still in a terminating namespace
until it is empty, before it removes the namespace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from corral.api.objects import Namespace, TypedObject
from corral.api.store import AlreadyExists, Store

DEFAULT = "default"
SYSTEM = "corral-system"
# What a kubectl user expects to find, plus corral's own: always present, never deleted.
BUILTIN: tuple[str, ...] = (DEFAULT, "kube-system", "kube-public", SYSTEM)


class NamespaceError(ValueError):
    """An object refused because of its namespace; the message says why and what to do."""


def new_namespace(name: str) -> Namespace:
    return Namespace.model_validate({"metadata": {"name": name}})


async def ensure_builtin(store: Store) -> list[str]:
    """Create the built-in namespaces that are missing; the names created."""
    made = []
    for name in BUILTIN:
        if await store.get(Namespace, name) is None:
            try:
                await store.create(new_namespace(name))
                made.append(name)
            except AlreadyExists:
                pass
    return made


async def check_namespaces(
    store: Store, objs: Iterable[TypedObject], coming: Iterable[str] = ()
) -> None:
    """NamespaceError unless every namespaced object's namespace exists and is not
    terminating, or is one of `coming` (namespaces written with these objects). A
    built-in namespace that is missing (an etcd no `corral up` has seen) is created, as
    it always exists in Kubernetes."""
    coming = set(coming)
    wanted: dict[str, TypedObject] = {}
    for o in objs:
        if type(o).NAMESPACED and o.namespace:
            wanted.setdefault(o.namespace, o)
    for ns, first in wanted.items():
        what = f"{first.KIND} {first.name!r}" if first.name else first.KIND
        cur = await store.get(Namespace, ns)
        if cur is None and ns in coming:
            continue
        if cur is None and ns in BUILTIN:
            with contextlib.suppress(AlreadyExists):
                await store.create(new_namespace(ns))
            continue
        if cur is None:
            raise NamespaceError(
                f"metadata.namespace: namespace {ns!r} not found, so {what} cannot be "
                f"created in it; create it first with `corral create namespace {ns}`"
            )
        if cur.terminating:
            raise NamespaceError(
                f"metadata.namespace: namespace {ns!r} is being terminated, so {what} "
                "cannot be created in it (wait until it is gone, then create it again)"
            )
