"""Namespaces as objects, against a real etcd: the built-in ones, adopting the
namespaces an older cluster used, the refusal of objects in a namespace that does not
exist, and deletion that takes the contents along (pods gracefully)."""

from __future__ import annotations

import pytest

from corral.api.namespaces import BUILTIN, NamespaceError, check_namespaces, new_namespace
from corral.api.objects import Namespace, Pod, ReplicationController, Service
from corral.api.store import Store, now_iso
from corral.cli.apply_objects import apply_objects
from corral.control.namespaces import NamespaceController
from tests.control_helpers import eventually, make_node, make_pod, running


def service(name: str, ns: str) -> Service:
    return Service.model_validate(
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]},
        }
    )


def rc(name: str, ns: str) -> ReplicationController:
    return ReplicationController.model_validate(
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "replicas": 2,
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}]},
                },
            },
        }
    )


async def test_objects_in_a_missing_or_terminating_namespace_are_refused(store: Store) -> None:
    with pytest.raises(NamespaceError, match="namespace 'shop' not found") as e:
        await apply_objects(store, [service("web", "default"), service("web", "shop")])
    assert "metadata.namespace" in str(e.value) and "corral create namespace shop" in str(e.value)
    # nothing was written, not even the object whose namespace is fine
    assert await store.get(Service, "web", "default") is None
    assert await store.get(Service, "web", "shop") is None
    # `default` is built in: it exists as soon as someone writes into it
    assert await store.get(Namespace, "default") is not None

    await store.create(new_namespace("shop"))
    await apply_objects(store, [service("web", "shop")])

    def mark(n: Namespace) -> Namespace:
        n.metadata.deletion_timestamp = now_iso()
        n.status.phase = "Terminating"
        return n

    await store.modify(Namespace, "shop", None, mark)
    with pytest.raises(NamespaceError, match="'shop' is being terminated"):
        await check_namespaces(store, [service("api", "shop")])


async def test_a_namespace_and_its_objects_in_one_apply(store: Store) -> None:
    planned = await apply_objects(store, [service("web", "team"), new_namespace("team")])
    assert [p.verb for p in planned] == ["created", "created"]
    assert await store.get(Service, "web", "team") is not None


async def test_controller_makes_builtins_and_adopts_namespaces_in_use(store: Store) -> None:
    await store.create(make_pod("old", namespace="legacy"))  # a cluster from before Namespaces
    async with running(NamespaceController(store).run()):

        async def names() -> set[str]:
            got = {n.name for n in (await store.list(Namespace))[0]}
            return got if {*BUILTIN, "legacy"} <= got else set()

        await eventually(names, what="built-in and adopted namespaces")


async def test_deleting_a_namespace_deletes_its_contents_pods_gracefully(store: Store) -> None:
    await store.create(make_node("n1"))
    await store.create(new_namespace("shop"))
    await store.create(new_namespace("other"))
    await store.create(rc("web", "shop"))
    await store.create(service("web", "shop"))
    await store.create(make_pod("bound", namespace="shop", nodeName="n1"))
    await store.create(make_pod("pending", namespace="shop"))
    await store.create(make_pod("bystander", namespace="other", nodeName="n1"))

    def mark(n: Namespace) -> Namespace:
        n.metadata.deletion_timestamp = now_iso()
        n.status.phase = "Terminating"
        return n

    await store.modify(Namespace, "shop", None, mark)
    async with running(NamespaceController(store, period=0.2).run()):

        async def waiting_on_the_bound_pod() -> Namespace | None:
            ns = await store.get(Namespace, "shop")
            cond = ns.status.condition("NamespaceContentRemaining") if ns else None
            return ns if cond is not None and cond.status == "True" else None

        ns = await eventually(waiting_on_the_bound_pod, what="NamespaceContentRemaining")
        cond = ns.status.condition("NamespaceContentRemaining")
        assert cond is not None
        assert cond.message == "Some resources are remaining: pods has 1 resource instances"
        assert ns.status.phase == "Terminating"
        assert await store.get(ReplicationController, "web", "shop") is None
        assert await store.get(Service, "web", "shop") is None
        assert await store.get(Pod, "pending", "shop") is None  # no node: deleted at once
        bound = await store.get(Pod, "bound", "shop")
        assert bound is not None and bound.metadata.deletion_timestamp  # its node stops it
        assert bound.metadata.deletion_grace_period_seconds == 30

        await store.delete(Pod, "bound", "shop")  # what its node does once it has stopped it

        async def gone() -> bool:
            return await store.get(Namespace, "shop") is None

        await eventually(gone, what="namespace shop removed")
    other = await store.get(Pod, "bystander", "other")
    assert other is not None and not other.metadata.deletion_timestamp
    assert await store.get(Namespace, "other") is not None
