"""Replication, node lifecycle, endpoints and service-IP controllers against a real etcd.

The tests write what node runtimes would (pod IPs, Ready conditions, removing
pods they finished terminating) and watch the controllers react.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections import Counter

import pytest

from corral.api.manifest import ManifestError, load_manifests
from corral.api.objects import (
    Deployment,
    Endpoints,
    EndpointSlice,
    Node,
    Pod,
    ReplicationController,
    Service,
)
from corral.api.store import Store
from corral.control.conditions import set_pod_condition
from corral.control.endpoints import EndpointsController
from corral.control.garbagecollector import GarbageCollector
from corral.control.nodelifecycle import NodeLifecycleController
from corral.control.replication import ReplicationManager
from corral.control.rollout import Strategy, rollout_step, strategy
from corral.control.scheduler import Scheduler
from corral.control.serviceips import (
    CLUSTER_IPS_PREFIX,
    NODE_PORTS_PREFIX,
    ServiceIPController,
)
from tests.control_helpers import eventually, make_node, make_pod, running, set_pod_running


def rc(name: str, replicas: int, labels: dict[str, str] | None = None) -> ReplicationController:
    labels = labels or {"app": name}
    return ReplicationController.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": labels,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "main",
                                "command": ["sleep", "infinity"],
                                "ports": [{"name": "http", "containerPort": 8080}],
                            }
                        ]
                    },
                },
            },
        }
    )


async def owned_pods(store: Store, owner: str, live_only: bool = True) -> list[Pod]:
    pods, _ = await store.list(Pod)
    return [
        p
        for p in pods
        if any(r.name == owner and r.controller for r in p.metadata.owner_references)
        and not (live_only and p.metadata.deletion_timestamp)
    ]


async def finish_terminating(store: Store) -> int:
    """The node runtimes' part: pods marked for deletion are stopped and removed."""
    pods, _ = await store.list(Pod)
    n = 0
    for p in pods:
        if p.metadata.deletion_timestamp:
            await store.delete(Pod, p.name, p.namespace)
            n += 1
    return n


class Matched(list):
    """Pods found, truthy even when empty, for `eventually`."""

    def __bool__(self) -> bool:
        return True


async def _count(store: Store, owner: str, n: int, bound: bool = False) -> list[Pod] | None:
    await finish_terminating(store)
    pods = await owned_pods(store, owner, live_only=False)
    if len(pods) == n and (not bound or all(p.spec.node_name for p in pods)):
        return Matched(pods)
    return None


async def test_rc_scales_up_and_down_preferring_unready_pods(store: Store) -> None:
    for i in range(3):
        await store.create(make_node(f"node-{i}"))
    await store.create(rc("web", 3))
    async with running(ReplicationManager(store).run(), Scheduler(store, seed=1).run()):
        pods = await eventually(lambda: _count(store, "web", 3, bound=True), what="3 pods")
        for p in pods:
            assert p.name.startswith("web-") and len(p.name) == len("web-") + 5
            assert p.metadata.labels == {"app": "web"}
            assert p.metadata.owner_references[0].kind == "ReplicationController"
        for i, p in enumerate(pods[:2]):
            await set_pod_running(store, p.name, f"10.244.{i}.2")
        unready = pods[2].name

        async def status(ready: int, replicas: int) -> bool:
            o = await store.get(ReplicationController, "web", "default")
            return o.status.replicas == replicas and o.status.ready_replicas == ready

        await eventually(lambda: status(2, 3), what="status 2/3 ready")
        await store.modify(ReplicationController, "web", "default", _scale(2))
        left = await eventually(lambda: _count(store, "web", 2), what="scaled to 2")
        assert unready not in {p.name for p in left}
        await eventually(lambda: status(2, 2), what="status 2/2 ready")

        await store.modify(ReplicationController, "web", "default", _scale(5))
        await eventually(lambda: _count(store, "web", 5, bound=True), what="scaled to 5")
        await store.modify(ReplicationController, "web", "default", _scale(0))
        await eventually(lambda: _count(store, "web", 0), what="scaled to 0")
        await eventually(lambda: status(0, 0), what="status 0/0")


def _scale(n: int):  # type: ignore[no-untyped-def]
    def change(o):  # type: ignore[no-untyped-def]
        o.spec.replicas = n
        return o

    return change


async def test_pods_lost_with_their_node_are_replaced_elsewhere(store: Store) -> None:
    for i in range(3):
        await store.create(make_node(f"node-{i}"))
    await store.create(rc("app", 6))
    lifecycle = NodeLifecycleController(store, monitor_grace=90, eviction_timeout=1, period=0.2)
    async with running(
        ReplicationManager(store).run(), Scheduler(store, seed=2).run(), lifecycle.run()
    ):
        pods = await eventually(lambda: _count(store, "app", 6, bound=True), what="6 pods")
        assert sorted(Counter(p.spec.node_name for p in pods).values()) == [2, 2, 2]

        # The Node object goes away: its pods are deleted and recreated elsewhere.
        await store.delete(Node, "node-2")

        async def off(node: str) -> list[Pod] | None:
            pods = await _count(store, "app", 6, bound=True)
            return pods if pods and all(p.spec.node_name != node for p in pods) else None

        pods = await eventually(lambda: off("node-2"), what="pods off node-2")
        assert sorted(Counter(p.spec.node_name for p in pods).values()) == [3, 3]

        # node-1's agent stops posting status: it becomes Unknown, then its pods move.
        def stale(n: Node) -> Node:
            c = n.status.condition("Ready")
            assert c is not None
            c.last_heartbeat_time = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120)
            )
            return n

        await store.modify(Node, "node-1", None, stale)
        pods = await eventually(lambda: off("node-1"), what="pods off node-1")
        assert {p.spec.node_name for p in pods} == {"node-0"}
        node = await store.get(Node, "node-1")
        ready = node.status.condition("Ready")
        assert ready.status == "Unknown" and ready.reason == "NodeStatusUnknown"


async def test_deployment_alias_and_owner_deletion(store: Store) -> None:
    dep = Deployment.model_validate(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "api"},
            "spec": {
                "replicas": 2,
                "selector": {
                    "matchLabels": {"app": "api"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["back"]}],
                },
                "template": {
                    "metadata": {"labels": {"app": "api", "tier": "back"}},
                    "spec": {"containers": [{"name": "c", "command": ["true"]}]},
                },
            },
        }
    )
    await store.create(dep)
    async with running(ReplicationManager(store).run(), GarbageCollector(store).run()):
        pods = await eventually(lambda: _count(store, "api", 2), what="2 pods")
        assert all(p.metadata.owner_references[0].kind == "Deployment" for p in pods)

        async def replicas() -> bool:
            d = await store.get(Deployment, "api", "default")
            return d.status.replicas == 2 and d.status.observed_generation == 1

        await eventually(replicas, what="deployment status")

        # A pod relabelled out of the selector is released and replaced.
        def relabel(p: Pod) -> Pod:
            p.metadata.labels["tier"] = "debug"
            return p

        await store.modify(Pod, pods[0].name, "default", relabel)

        async def released() -> bool:
            p = await store.get(Pod, pods[0].name, "default")
            return p is not None and not p.metadata.owner_references

        await eventually(released, what="relabelled pod released")
        new = await eventually(lambda: _count(store, "api", 2), what="replacement")
        assert pods[0].name not in {p.name for p in new}

        # Deleting the owner takes its pods along (the garbage collector's part).
        await store.delete(Deployment, "api", "default")
        await eventually(lambda: _count(store, "api", 0), what="pods gone with owner")


# ---------------------------------------------------------------- endpoints


def web_service(**spec: object) -> Service:
    return Service.model_validate(
        {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                **spec,
            },
        }
    )


async def _endpoints(store: Store) -> tuple[Endpoints | None, list[EndpointSlice]]:
    slices, _ = await store.list(EndpointSlice, "default")
    return (
        await store.get(Endpoints, "web", "default"),
        [s for s in slices if s.metadata.labels.get("kubernetes.io/service-name") == "web"],
    )


def _slice_state(slices: list[EndpointSlice]) -> dict[str, tuple[bool, bool, bool]]:
    return {
        e.addresses[0]: (
            bool(e.conditions.ready),
            bool(e.conditions.serving),
            bool(e.conditions.terminating),
        )
        for s in slices
        for e in s.endpoints
    }


def _ep_state(ep: Endpoints | None) -> tuple[set[str], set[str]]:
    if ep is None:
        return set(), set()
    return (
        {a.ip for s in ep.subsets for a in s.addresses},
        {a.ip for s in ep.subsets for a in s.not_ready_addresses},
    )


async def test_endpoints_follow_readiness_and_termination(store: Store) -> None:
    await store.create(web_service())
    for i in range(3):
        await store.create(
            make_pod(
                f"web-{i}",
                {"app": "web"},
                node_name="node-0",
                ports=[{"name": "http", "containerPort": 8080 + i}],
            )
        )
    await store.create(make_pod("other", {"app": "db"}, node_name="node-0"))
    async with running(EndpointsController(store).run()):
        await set_pod_running(store, "web-0", "10.244.0.10", ready=True)
        await set_pod_running(store, "web-1", "10.244.0.11", ready=False)
        await set_pod_running(store, "other", "10.244.0.99", ready=True)

        async def state(want: dict) -> bool:
            return _slice_state((await _endpoints(store))[1]) == want

        await eventually(
            lambda: state(
                {"10.244.0.10": (True, True, False), "10.244.0.11": (False, False, False)}
            )
        )
        ep, slices = await _endpoints(store)
        assert _ep_state(ep) == ({"10.244.0.10"}, {"10.244.0.11"})
        # The named targetPort resolves per pod: the two pods use different ports, so
        # they land in different subsets and slices; the first slice is named `web`.
        assert sorted(s.ports[0].port for s in ep.subsets) == [8080, 8081]
        assert sorted(s.ports[0].port for s in slices) == [8080, 8081]
        assert "web" in {s.name for s in slices}
        addr = next(a for s in ep.subsets for a in s.addresses)
        assert addr.node_name == "node-0" and addr.target_ref.name == "web-0"

        # web-1 becomes ready, web-2 gets an IP.
        await set_pod_running(store, "web-1", "10.244.0.11", ready=True)
        await set_pod_running(store, "web-2", "10.244.0.12", ready=True)
        await eventually(
            lambda: state(
                {
                    "10.244.0.10": (True, True, False),
                    "10.244.0.11": (True, True, False),
                    "10.244.0.12": (True, True, False),
                }
            )
        )
        # web-0 is being deleted: still serving, no longer ready, gone from v1 Endpoints.
        await store.modify(Pod, "web-0", "default", _mark_deleted)
        await eventually(
            lambda: state(
                {
                    "10.244.0.10": (False, True, True),
                    "10.244.0.11": (True, True, False),
                    "10.244.0.12": (True, True, False),
                }
            )
        )
        assert _ep_state((await _endpoints(store))[0]) == ({"10.244.0.11", "10.244.0.12"}, set())
        # Its node removes it; the slice follows. Then the service goes, and its endpoints.
        await store.delete(Pod, "web-0", "default")
        await eventually(
            lambda: state({"10.244.0.11": (True, True, False), "10.244.0.12": (True, True, False)})
        )
        await store.delete(Service, "web", "default")
        await eventually(lambda: _gone(store), what="endpoints removed with the service")


async def _gone(store: Store) -> bool:
    return (await _endpoints(store)) == (None, [])


def _mark_deleted(p: Pod) -> Pod:
    p.metadata.deletion_timestamp = "2026-01-01T00:00:00Z"
    return p


async def test_publish_not_ready_hostnames_and_selectorless_services(store: Store) -> None:
    await store.create(web_service(publishNotReadyAddresses=True))
    await store.create(
        make_pod(
            "web-a",
            {"app": "web"},
            node_name="n",
            hostname="alpha",
            subdomain="web",
            ports=[{"name": "http", "containerPort": 80}],
        )
    )
    # No port named http: left out.
    await store.create(
        make_pod("web-b", {"app": "web"}, node_name="n", ports=[{"containerPort": 80}])
    )
    manual = Service.model_validate(
        {"metadata": {"name": "ext"}, "spec": {"ports": [{"port": 5432}]}}
    )
    await store.create(manual)
    user_ep = Endpoints.model_validate(
        {
            "metadata": {"name": "ext"},
            "subsets": [{"addresses": [{"ip": "10.1.2.3"}], "ports": [{"port": 5432}]}],
        }
    )
    await store.create(user_ep)
    async with running(EndpointsController(store).run()):
        await set_pod_running(store, "web-a", "10.244.1.5", ready=False)
        await set_pod_running(store, "web-b", "10.244.1.6", ready=True)

        async def published() -> tuple[Endpoints, list[EndpointSlice]] | None:
            ep, slices = await _endpoints(store)
            ok = _ep_state(ep) == ({"10.244.1.5"}, set()) and _slice_state(slices) == {
                "10.244.1.5": (True, True, False)
            }
            return (ep, slices) if ok else None

        ep, (sl,) = await eventually(published, what="not-ready pod published")
        assert ep.subsets[0].addresses[0].hostname == "alpha"
        assert ep.subsets[0].ports[0].port == 80
        assert sl.endpoints[0].hostname == "alpha"
    ext = await store.get(Endpoints, "ext", "default")
    assert ext is not None and ext.subsets[0].addresses[0].ip == "10.1.2.3"
    assert await store.get(EndpointSlice, "ext", "default") is None


# ---------------------------------------------------------------- service IPs


async def test_cluster_ips_and_node_ports_are_allocated_once_and_freed(store: Store) -> None:
    svc_a = web_service()
    svc_b = Service.model_validate(
        {
            "metadata": {"name": "nodeport"},
            "spec": {
                "type": "NodePort",
                "selector": {"app": "x"},
                "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 81, "nodePort": 30080}],
            },
        }
    )
    dns = Service.model_validate(
        {
            "metadata": {"name": "dns", "namespace": "kube-system"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 53, "protocol": "UDP"}]},
        }
    )
    headless = Service.model_validate(
        {"metadata": {"name": "hl"}, "spec": {"clusterIP": "None", "selector": {"a": "b"}}}
    )
    for s in (svc_a, svc_b, dns, headless):
        await store.create(s)
    async with running(ServiceIPController(store, seed=3).run()):

        async def allocated() -> list[Service] | None:
            svcs, _ = await store.list(Service)
            done = all(
                s.spec.cluster_ip and all(p.node_port for p in s.spec.ports)
                for s in svcs
                if s.spec.type == "NodePort"
            ) and all(s.spec.cluster_ip for s in svcs)
            # ...and every address is reserved (the DNS one was written by its user).
            held = (await store.list_raw(CLUSTER_IPS_PREFIX))[0]
            return svcs if done and len(held) == 3 else None

        svcs = {s.name: s for s in await eventually(allocated, what="allocation")}
        ips = [svcs[n].spec.cluster_ip for n in ("web", "nodeport")]
        assert len(set(ips)) == 2
        for ip in ips:
            assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.96.0.0/12")
            assert ip != "10.96.0.10"
        assert svcs["web"].spec.cluster_ips == [svcs["web"].spec.cluster_ip]
        assert svcs["dns"].spec.cluster_ip == "10.96.0.10"
        assert svcs["hl"].spec.cluster_ip == "None"
        a, b = (p.node_port for p in svcs["nodeport"].spec.ports)
        assert 30000 <= a <= 32767 and a != 30080 and b == 30080
        held = {kv.key for kv in (await store.list_raw(CLUSTER_IPS_PREFIX))[0]}
        assert held == {CLUSTER_IPS_PREFIX + ip for ip in [*ips, "10.96.0.10"]}

        # A second service asking for a taken address does not get it.
        await store.create(
            Service.model_validate(
                {
                    "metadata": {"name": "thief"},
                    "spec": {"clusterIP": ips[0], "ports": [{"port": 1}]},
                }
            )
        )
        await store.delete(Service, "nodeport", "default")

        async def freed() -> bool:
            ports = (await store.list_raw(NODE_PORTS_PREFIX))[0]
            ipkeys = {kv.key for kv in (await store.list_raw(CLUSTER_IPS_PREFIX))[0]}
            return not ports and CLUSTER_IPS_PREFIX + ips[1] not in ipkeys

        await eventually(freed, what="node ports and IP freed")
        thief_ip = (await store.list_raw(CLUSTER_IPS_PREFIX + ips[0]))[0][0].value
        assert b'"default/web"' in thief_ip


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (
            "kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {containers: []}\n",
            "spec.containers",
        ),
        (
            "kind: ReplicationController\napiVersion: v1\nmetadata: {name: r}\n"
            "spec: {replicas: -1, template: {metadata: {labels: {a: b}},"
            " spec: {containers: [{name: c}]}}}\n",
            "spec.replicas",
        ),
        (
            "kind: Pod\napiVersion: v1\nmetadata: {name: p}\n"
            "spec: {containers: [{name: c, comand: [x]}]}\n",
            "spec.containers[0].comand",
        ),
        (
            "kind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {containers: [{name: c, "
            "resources: {requests: {memory: 12 apples}}}]}\n",
            "spec.containers[0].resources.requests.memory",
        ),
        (
            "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: d}\n"
            "spec: {replicas: -3, selector: {matchLabels: {a: b}}, template: {metadata: "
            "{labels: {a: b}}, spec: {containers: [{name: c}]}}}\n",
            "spec.replicas",
        ),
    ],
)
def test_bad_manifests_are_refused_naming_the_field(doc: str, field: str) -> None:
    with pytest.raises(ManifestError) as e:
        load_manifests(doc)
    assert field in str(e.value)


# ---------------------------------------------------------------- rollouts


def deployment(replicas: int, command: str, strategy: dict | None = None) -> Deployment:
    return Deployment.model_validate(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "app"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "app"}},
                "strategy": strategy,
                "template": {
                    "metadata": {"labels": {"app": "app"}},
                    "spec": {"containers": [{"name": "c", "command": [command]}]},
                },
            },
        }
    )


async def play_runtime(store: Store) -> list[Pod]:
    """One pass of what node runtimes do: finish terminating pods, make the rest Ready."""
    await finish_terminating(store)
    pods, _ = await store.list(Pod)
    for i, p in enumerate(pods):
        if not p.ready:
            await set_pod_running(store, p.name, f"10.244.3.{i + 2}")
    return (await store.list(Pod))[0]


def _commands(pods: list[Pod]) -> Counter:
    return Counter(p.spec.containers[0].command[0] for p in pods)


@pytest.mark.parametrize("kind", ["RollingUpdate", "Recreate"])
async def test_deployment_template_change_rolls_out(store: Store, kind: str) -> None:
    await store.create(deployment(4, "v1", {"type": kind}))

    def to_v2(d: Deployment) -> Deployment:
        d.spec.template.spec.containers[0].command = ["v2"]
        d.metadata.generation = (d.metadata.generation or 1) + 1
        return d

    async with running(ReplicationManager(store).run()):

        async def settled(cmd: str) -> bool:
            pods = await play_runtime(store)
            return len(pods) == 4 and _commands(pods) == {cmd: 4} and all(p.ready for p in pods)

        await eventually(lambda: settled("v1"), what="4 v1 pods ready")
        await store.modify(Deployment, "app", "default", to_v2)
        seen: list[Counter] = []

        async def rolled() -> bool:
            pods = await play_runtime(store)
            live = [p for p in pods if not p.metadata.deletion_timestamp]
            seen.append(_commands(live))
            if kind == "RollingUpdate":
                # maxSurge 25% of 4 = 1, maxUnavailable 25% = 1.
                assert len(live) <= 5, seen
                assert sum(p.ready for p in live) >= 3, seen
            else:
                assert not (_commands(pods)["v1"] and _commands(pods)["v2"]), seen
            return len(pods) == 4 and _commands(pods) == {"v2": 4}

        await eventually(rolled, what="rollout to v2")
    assert any(c["v1"] and c["v2"] for c in seen) == (kind == "RollingUpdate")
    pods, _ = await store.list(Pod)
    assert len({p.metadata.labels["pod-template-hash"] for p in pods}) == 1


def test_rollout_arithmetic() -> None:
    dep = deployment(10, "v1", {"rollingUpdate": {"maxSurge": 3, "maxUnavailable": "10%"}})
    assert strategy(dep) == Strategy("RollingUpdate", 3, 1)
    assert strategy(deployment(3, "v1")) == Strategy("RollingUpdate", 1, 0)
    with pytest.raises(ValueError, match="maxSurge"):
        strategy(deployment(3, "v1", {"rollingUpdate": {"maxSurge": "lots"}}))
    ready = make_pod("r")
    set_pod_condition(ready.status, "Ready", "True")
    old = [ready.model_copy(deep=True) for _ in range(10)]
    step = rollout_step(
        10, Strategy("RollingUpdate", 3, 1), [], old, 0, lambda p: p.ready, lambda p: 0
    )
    # Up to 13 pods may exist: 3 new at once; 1 old may go (9 stay available).
    assert step.create == 3 and len(step.delete) == 1


async def test_work_queue_coalesces_keys_and_never_runs_one_twice_at_once() -> None:
    from corral.control.workqueue import WorkQueue, run_worker

    q = WorkQueue()
    running_now: set[str] = set()
    runs: list[str] = []
    gate = asyncio.Event()

    async def reconcile(key: str) -> None:
        assert key not in running_now
        running_now.add(key)
        runs.append(key)
        if key == "a" and runs.count("a") == 1:
            await gate.wait()
        running_now.discard(key)

    for key in ("a", "b", "a", "b"):
        q.add(key)
    worker = asyncio.create_task(run_worker(q, reconcile, "test"))
    await eventually(lambda: _true(runs == ["a"]), what="a running")
    q.add("a")  # while it runs: it runs once more afterwards, not concurrently
    q.add("a")
    gate.set()
    await eventually(lambda: _true(sorted(runs) == ["a", "a", "b"]), what="drained")
    worker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await worker


async def _true(value: bool) -> bool:
    return value


# ---------------------------------------------------------------- at scale


def _bulk_service(i: int, **spec: object) -> Service:
    return Service.model_validate(
        {
            "metadata": {"name": f"bulk-{i}"},
            "spec": {"selector": {"app": f"bulk-{i}"}, "ports": [{"port": 80}], **spec},
        }
    )


async def _commit_all(store: Store, objs: list) -> None:
    from corral.api.store import batched

    for batch in batched(objs, size=lambda o: 2000):
        await store.commit(creates=batch)


async def test_racing_allocators_never_share_a_vip(store: Store) -> None:
    """Two controllers with the same seed (so their memory proposes the same addresses),
    one of them restarted half-way, and `corral expose`'s allocator claiming too: every
    Service ends with its own VIP, and every address key names the Service holding it."""
    from corral.control.serviceips import Allocator, Holder

    n = 300
    await _commit_all(store, [_bulk_service(i) for i in range(n)])
    nodeports = [_bulk_service(n + i, type="NodePort") for i in range(20)]
    await _commit_all(store, nodeports)
    first = ServiceIPController(store, seed=7)
    second = ServiceIPController(store, seed=7)
    tasks = [asyncio.create_task(c.run()) for c in (first, second)]

    async def some_done() -> bool:
        svcs, _ = await store.list(Service)
        return sum(1 for s in svcs if s.spec.cluster_ip) >= 50

    try:
        await eventually(some_done, what="allocation under way")
        # Restart the first controller mid-way; meanwhile expose-style claims run.
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        tasks[0] = asyncio.create_task(ServiceIPController(store, seed=7).run())
        claimer = Allocator(store)
        exposed = []
        for i in range(5):
            svc = _bulk_service(1000 + i)
            svc.metadata.uid = f"uid-exposed-{i}"
            await claimer.fill(svc)
            exposed.append(await store.create(svc))

        async def all_done() -> list[Service] | None:
            svcs, _ = await store.list(Service)
            ok = all(s.spec.cluster_ip for s in svcs) and all(
                p.node_port for s in svcs if s.spec.type == "NodePort" for p in s.spec.ports
            )
            held = (await store.list_raw(CLUSTER_IPS_PREFIX))[0]
            return svcs if ok and len(held) == len(svcs) else None

        svcs = await eventually(all_done, timeout=60, what="every service allocated")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert len(svcs) == n + 20 + 5
    ips = [s.spec.cluster_ip for s in svcs]
    assert len(set(ips)) == len(ips), "two services share a VIP"
    held = {
        kv.key.removeprefix(CLUSTER_IPS_PREFIX): Holder.decode(kv.value)
        for kv in (await store.list_raw(CLUSTER_IPS_PREFIX))[0]
    }
    assert held == {s.spec.cluster_ip: Holder(s.key_name, s.metadata.uid) for s in svcs}
    ports = [p.node_port for s in svcs for p in s.spec.ports if s.spec.type == "NodePort"]
    assert len(set(ports)) == len(ports) == 20
    assert len((await store.list_raw(NODE_PORTS_PREFIX))[0]) == 20
    assert all(s.spec.cluster_ips == [s.spec.cluster_ip] for s in svcs)
    # The race did happen: memory proposed taken addresses, and etcd said no.
    assert first.conflicts + second.conflicts > 0


async def test_endpoints_follow_bulk_changes(store: Store) -> None:
    """Hundreds of Services and pods changed at once (relabelled, deleted, readiness
    flipped, Services deleted and added): every Endpoints and slice ends up exactly
    what the pods say."""
    from corral.api.objects import PodIP

    n, per = 150, 2
    await _commit_all(store, [_bulk_service(i) for i in range(n)])

    def bulk_pod(i: int, j: int, app: int, ready: bool = True) -> Pod:
        p = make_pod(f"p-{i}-{j}", {"app": f"bulk-{app}"})
        ip = f"10.244.{(i * per + j) // 200}.{(i * per + j) % 200 + 1}"
        p.status.phase = "Running"
        p.status.pod_ip, p.status.pod_ips = ip, [PodIP(ip=ip)]
        set_pod_condition(p.status, "Ready", "True" if ready else "False")
        return p

    await _commit_all(store, [bulk_pod(i, j, i) for i in range(n) for j in range(per)])
    ctrl = EndpointsController(store)

    async def matches_pods() -> bool:
        svcs, _ = await store.list(Service)
        pods, _ = await store.list(Pod)
        eps = {e.name: e for e in (await store.list(Endpoints))[0]}
        slices = {s.name: s for s in (await store.list(EndpointSlice))[0]}
        if set(eps) != {s.name for s in svcs} or set(slices) != set(eps):
            return False
        for s in svcs:
            sel = [p for p in pods if p.metadata.labels.get("app") == s.spec.selector["app"]]
            ready = {p.status.pod_ip for p in sel if p.ready}
            unready = {p.status.pod_ip for p in sel if not p.ready}
            if _ep_state(eps[s.name]) != (ready, unready):
                return False
            got = {e.addresses[0]: e.conditions.ready for e in slices[s.name].endpoints}
            if got != {**{ip: True for ip in ready}, **{ip: False for ip in unready}}:
                return False
        return True

    async with running(ctrl.run()):
        await eventually(matches_pods, timeout=60, what="initial endpoints")
        pods = {p.name: p for p in (await store.list(Pod))[0]}
        updates, deletes = [], []
        for i in range(n):
            if i % 3 == 0:  # move the pod to the next Service
                p = pods[f"p-{i}-0"]
                p.metadata.labels = {"app": f"bulk-{(i + 1) % n}"}
                updates.append(p)
            elif i % 3 == 1:  # not ready any more
                p = pods[f"p-{i}-1"]
                set_pod_condition(p.status, "Ready", "False")
                updates.append(p)
            else:  # gone
                deletes.append(
                    (Pod, f"p-{i}-1", "default", int(pods[f"p-{i}-1"].metadata.resource_version))
                )
        from corral.api.store import batched

        for b in batched(updates, size=lambda o: 2000):
            await store.commit(updates=b)
        for b in batched(deletes, size=lambda o: 100):
            await store.commit(deletes=b)
        gone = [f"bulk-{i}" for i in range(0, n, 10)]
        for name in gone:
            await store.delete(Service, name, "default")
        await _commit_all(store, [_bulk_service(n + i) for i in range(20)])
        await _commit_all(store, [bulk_pod(n + i, 0, n + i) for i in range(20)])
        await eventually(matches_pods, timeout=60, what="endpoints after the bulk changes")
        # Someone deletes some of them behind the controller's back: they come back.
        for i in range(1, 40, 4):
            await store.delete(Endpoints, f"bulk-{i}", "default")
            await store.delete(EndpointSlice, f"bulk-{i + 1}", "default")
        await eventually(matches_pods, timeout=60, what="deleted endpoints rewritten")
    assert ctrl.writes > 0


async def test_heap_tuning_freezes_the_caches_once_synced(store: Store) -> None:
    """The component waits for the informers, then freezes; the test puts back the
    collector as it found it."""
    import gc

    from corral.api.informer import InformerFactory
    from corral.daemon.heap import HeapTuning

    await store.create(_bulk_service(1))
    thresholds = gc.get_threshold()
    factory = InformerFactory(store)
    services = factory.informer(Service)
    heap = HeapTuning(factory)
    try:
        async with running(factory.run(), heap.run()):
            await eventually(lambda: _true(heap.freezes >= 1), what="frozen")
            assert len(services.cache) == 1
            assert heap.debug_state()["frozen"] > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
