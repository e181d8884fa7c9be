"""Pure pieces of the API server: the registry covers every kind, paths and selectors
parse as kube-apiserver's do."""

from __future__ import annotations

import pytest

from corral.api.objects import KINDS
from corral.api.selectors import matches_label_selector, parse_selector
from corral.apiserver import errors, registry
from corral.apiserver.selectors import matcher
from corral.apiserver.server import parse_path


def test_every_kind_is_served_once() -> None:
    assert sorted(r.kind for r in registry.RESOURCES) == sorted(k.KIND for k in KINDS)
    assert registry.lookup("corral.dev", "v1", "networkconfigs") is not None
    assert registry.BY_KIND["Pod"].short_names == ("po",)
    assert registry.BY_KIND["Endpoints"].short_names == ("ep",)


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/api/v1/pods", ("pods", None, None, "")),
        ("/api/v1/namespaces/a/pods/p/status", ("pods", "a", "p", "status")),
        ("/api/v1/namespaces/a", ("namespaces", None, "a", "")),
        ("/api/v1/namespaces/a/status", ("namespaces", None, "a", "status")),
        ("/apis/apps/v1/namespaces/x/deployments", ("deployments", "x", None, "")),
        ("/api/v1/nodes/n1", ("nodes", None, "n1", "")),
    ],
)
def test_paths(path: str, want: tuple) -> None:
    t = parse_path(path)
    assert t is not None
    assert (t.resource.plural, t.namespace, t.name, t.subresource) == want


@pytest.mark.parametrize(
    "path", ["/api/v1/gizmos", "/api/v1/pods/p", "/apis/apps/v1/pods", "/api/v1/nodes/n/log"]
)
def test_paths_that_name_nothing(path: str) -> None:
    assert parse_path(path) is None


def test_label_selectors() -> None:
    reqs = parse_selector("app in (a,b), tier notin (x), !gone, env, k!=v")
    assert reqs is not None

    def labels_match(labels: dict[str, str]) -> bool:
        return matches_label_selector(reqs, labels)

    assert labels_match({"app": "a", "env": "p", "k": "w"})
    assert not labels_match({"app": "c", "env": "p"})
    assert not labels_match({"app": "a", "env": "p", "gone": "1"})
    assert not labels_match({"app": "a"})
    assert not labels_match({"app": "a", "env": "p", "tier": "x"})
    twice = parse_selector("a=1,a=2")  # both must hold: nothing matches
    assert twice is not None and not matches_label_selector(twice, {"a": "1"})
    with pytest.raises(errors.APIError) as e:
        matcher("a in b", None, (), "pods")
    assert e.value.code == 400


def test_field_selectors() -> None:
    m = matcher(
        None, "spec.nodeName=n1,status.phase!=Failed", ("spec.nodeName", "status.phase"), "pods"
    )
    assert m is not None
    assert m({"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    assert not m({"spec": {"nodeName": "n2"}, "status": {"phase": "Running"}})
    assert not m({"spec": {"nodeName": "n1"}, "status": {"phase": "Failed"}})
    assert matcher("", "", (), "pods") is None
