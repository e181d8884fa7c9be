"""The Endpoints and EndpointSlice builders of corral.control.endpoints, as pure
functions: a Service and pods in, the objects the controller would write out.

The controller's loop against a store (write_if_changed, cleanup) is tested in
test_controllers.py.
"""

from __future__ import annotations

import re
from typing import Any

from corral.api.objects import Pod, Service, ServicePort
from corral.common.labels import ENDPOINTSLICE_MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from corral.control.conditions import set_pod_condition
from corral.control.endpoints import (
    MANAGED_BY,
    build_endpoints,
    build_slices,
    pod_ports,
    resolve_target_port,
    selected_pods,
    slice_name,
)
from tests.control_helpers import make_pod


def svc(
    name: str = "web",
    ports: list[dict[str, Any]] | None = None,
    selector: dict[str, str] | None = None,
    **spec: Any,
) -> Service:
    return Service.model_validate(
        {
            "metadata": {
                "name": name,
                "namespace": "default",
                "uid": "svc-uid",
                "labels": {"x": "y"},
            },
            "spec": {
                "selector": {"app": "web"} if selector is None else selector,
                "ports": ports
                if ports is not None
                else [{"name": "http", "port": 80, "targetPort": 8080}],
                **spec,
            },
        }
    )


def pod(
    name: str,
    ip: str | None,
    ready: bool = True,
    ports: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    deleting: bool = False,
    namespace: str = "default",
    **spec: Any,
) -> Pod:
    p = make_pod(name, labels or {"app": "web"}, namespace=namespace, ports=ports, **spec)
    p.metadata.uid = f"uid-{name}"
    p.spec.node_name = "node-1"
    p.status.phase = phase
    p.status.pod_ip = ip
    set_pod_condition(p.status, "Ready", "True" if ready else "False")
    if deleting:
        p.metadata.deletion_timestamp = "2026-01-01T00:00:00Z"
    return p


def port(**kw: Any) -> ServicePort:
    return ServicePort.model_validate(kw)


# ------------------------------------------------------------ ports and selection


def test_resolve_target_port() -> None:
    p = pod(
        "a",
        "10.0.0.1",
        ports=[
            {"name": "http", "containerPort": 8080},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        ],
    )
    assert resolve_target_port(port(port=80), p) == 80  # no targetPort: the port itself
    assert resolve_target_port(port(port=80, targetPort=9090), p) == 9090
    assert resolve_target_port(port(port=80, targetPort="http"), p) == 8080
    assert resolve_target_port(port(port=53, targetPort="dns", protocol="UDP"), p) == 53
    assert resolve_target_port(port(port=53, targetPort="dns"), p) is None  # TCP: no such port
    assert resolve_target_port(port(port=80, targetPort="nope"), p) is None


def test_pod_ports_keeps_only_the_ports_the_pod_has() -> None:
    s = svc(
        ports=[
            {"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},
            {"name": "admin", "port": 81, "targetPort": "admin"},
        ]
    )
    p = pod("a", "10.0.0.1", ports=[{"name": "http", "containerPort": 8080}])
    assert pod_ports(s, p) == (("http", 8080, "TCP", "http"),)


def test_selected_pods_need_an_ip_a_match_the_namespace_and_to_be_unfinished() -> None:
    pods = [
        pod("b", "10.0.0.2"),
        pod("a", "10.0.0.2"),
        pod("c", "10.0.0.1"),
        pod("no-ip", None),
        pod("done", "10.0.0.9", phase="Succeeded"),
        pod("failed", "10.0.0.8", phase="Failed"),
        pod("other-app", "10.0.0.7", labels={"app": "db"}),
        pod("elsewhere", "10.0.0.6", namespace="shop"),
        pod("going", "10.0.0.5", deleting=True),
    ]
    names = [p.name for p in selected_pods(svc(), pods)]
    assert names == ["c", "a", "b", "going"]  # by IP, then name


# ------------------------------------------------------------ Endpoints


def test_endpoints_split_ready_and_not_ready_and_leave_terminating_out() -> None:
    pods = [
        pod("a", "10.0.0.1"),
        pod("b", "10.0.0.2", ready=False),
        pod("c", "10.0.0.3", deleting=True),
    ]
    ep = build_endpoints(svc(), pods)
    assert ep.name == "web" and ep.namespace == "default"
    assert ep.metadata.labels == {"x": "y"}
    owner = ep.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == (
        "Service",
        "web",
        "svc-uid",
        True,
    )
    (sub,) = ep.subsets
    assert [a.ip for a in sub.addresses] == ["10.0.0.1"]
    assert [a.ip for a in sub.not_ready_addresses] == ["10.0.0.2"]
    assert [(p.name, p.port, p.protocol) for p in sub.ports] == [("http", 8080, "TCP")]
    a = sub.addresses[0]
    assert a.node_name == "node-1" and a.target_ref.name == "a" and a.target_ref.uid == "uid-a"  # type: ignore[union-attr]


def test_publish_not_ready_addresses_makes_every_pod_an_address() -> None:
    pods = [pod("a", "10.0.0.1", ready=False), pod("b", "10.0.0.2", deleting=True)]
    (sub,) = build_endpoints(svc(publishNotReadyAddresses=True), pods).subsets
    assert [a.ip for a in sub.addresses] == ["10.0.0.1", "10.0.0.2"]
    assert sub.not_ready_addresses == []


def test_pods_resolving_a_named_port_differently_get_their_own_subset() -> None:
    s = svc(ports=[{"name": "http", "port": 80, "targetPort": "http"}])
    pods = [
        pod("a", "10.0.0.1", ports=[{"name": "http", "containerPort": 8080}]),
        pod("b", "10.0.0.2", ports=[{"name": "http", "containerPort": 9090}]),
        pod("c", "10.0.0.3", ports=[{"name": "http", "containerPort": 8080}]),
        pod("none", "10.0.0.4"),  # lacks the port: left out
    ]
    subsets = build_endpoints(s, pods).subsets
    got = sorted(([a.ip for a in sub.addresses], sub.ports[0].port) for sub in subsets)
    assert got == [(["10.0.0.1", "10.0.0.3"], 8080), (["10.0.0.2"], 9090)]


def test_a_headless_service_without_ports_lists_its_pods_without_ports() -> None:
    headless = svc(ports=[], clusterIP="None")
    (sub,) = build_endpoints(headless, [pod("a", "10.0.0.1")]).subsets
    assert [a.ip for a in sub.addresses] == ["10.0.0.1"] and sub.ports == []


def test_hostname_only_for_pods_in_the_services_subdomain() -> None:
    pods = [
        pod("a", "10.0.0.1", subdomain="web", hostname="alpha"),
        pod("b", "10.0.0.2", subdomain="web"),
        pod("c", "10.0.0.3"),
    ]
    (sub,) = build_endpoints(svc(), pods).subsets
    assert [a.hostname for a in sub.addresses] == ["alpha", "b", None]
    (sl,) = build_slices(svc(), pods)
    assert [e.hostname for e in sl.endpoints] == ["alpha", "b", None]


def test_no_pods_no_subsets() -> None:
    assert build_endpoints(svc(), []).subsets == []


# ------------------------------------------------------------ EndpointSlices


def test_slice_conditions_ready_serving_terminating() -> None:
    pods = [
        pod("ready", "10.0.0.1"),
        pod("unready", "10.0.0.2", ready=False),
        pod("leaving", "10.0.0.3", deleting=True),
        pod("leaving-unready", "10.0.0.4", ready=False, deleting=True),
    ]
    (sl,) = build_slices(svc(), pods)
    conds = {e.target_ref.name: e.conditions for e in sl.endpoints}  # type: ignore[union-attr]
    as_tuples = {n: (c.ready, c.serving, c.terminating) for n, c in conds.items()}
    assert as_tuples == {
        "ready": (True, True, False),
        "unready": (False, False, False),
        "leaving": (False, True, True),  # still serving while it drains
        "leaving-unready": (False, False, True),
    }
    (sl,) = build_slices(svc(publishNotReadyAddresses=True), pods)
    assert all(e.conditions.ready and e.conditions.serving for e in sl.endpoints)
    assert [e.conditions.terminating for e in sl.endpoints] == [False, False, True, True]


def test_slice_names_labels_owner_and_ports() -> None:
    s = svc(ports=[{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"}])
    pods = [
        pod("a", "10.0.0.1", ports=[{"name": "http", "containerPort": 8080}]),
        pod("b", "10.0.0.2", ports=[{"name": "http", "containerPort": 9090}]),
    ]
    slices = build_slices(s, pods)
    assert len(slices) == 2
    first, second = slices
    assert first.name == "web"
    assert re.fullmatch(r"web-[0-9a-f]{6}", second.name)
    for sl in slices:
        assert sl.metadata.labels == {
            SERVICE_NAME_LABEL: "web",
            ENDPOINTSLICE_MANAGED_BY_LABEL: MANAGED_BY,
        }
        assert sl.metadata.owner_references[0].uid == "svc-uid"
        assert sl.address_type == "IPv4"
    ports = sorted((sl.ports[0].port, sl.endpoints[0].addresses[0]) for sl in slices)
    assert ports == [(8080, "10.0.0.1"), (9090, "10.0.0.2")]
    assert first.ports[0].name == "http" and first.ports[0].app_protocol == "http"
    # The same input, the same names: the controller does not churn slices.
    assert [x.name for x in build_slices(s, list(reversed(pods)))] == [first.name, second.name]


def test_a_service_with_no_pods_still_gets_its_slice() -> None:
    (sl,) = build_slices(svc(), [])
    assert sl.name == "web" and sl.endpoints == [] and sl.ports == []


def test_slice_name_of_a_long_service_stays_a_valid_name() -> None:
    long = svc(name="s" * 63)
    key = (("http", 8080, "TCP", None),)
    assert slice_name(long, key, first=True) == "s" * 63
    other = slice_name(long, key, first=False)
    assert len(other) == 63 and other.startswith("s" * 56 + "-")
    assert slice_name(long, key, first=False) == other  # stable
