"""Field ownership and server-side apply's merge, on plain objects (pure logic)."""

from __future__ import annotations

import pytest

from corral.api.objects import Deployment
from corral.apiserver import errors, managedfields
from corral.apiserver.registry import BY_KIND

DEPLOY = BY_KIND["Deployment"]


def deploy(replicas: int | None = 1, image: str = "a", labels: dict | None = None) -> dict:
    spec: dict = {
        "selector": {"matchLabels": {"app": "x"}},
        "template": {
            "metadata": {"labels": {"app": "x"}},
            "spec": {"containers": [{"name": "c", "image": image, "command": ["sleep"]}]},
        },
    }
    if replicas is not None:
        spec["replicas"] = replicas
    md: dict = {"name": "x", "namespace": "default"}
    if labels:
        md["labels"] = labels
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": md, "spec": spec}


def test_fields_v1_round_trips_with_keyed_items() -> None:
    paths = managedfields.field_set(deploy(), Deployment)
    item = ("f:spec", "f:template", "f:spec", "f:containers", 'k:{"name":"c"}')
    assert item in paths and (*item, "f:image") in paths
    doc = managedfields.to_fields_v1(paths)
    assert "." in doc["f:spec"]["f:template"]["f:spec"]["f:containers"]['k:{"name":"c"}']
    assert managedfields.from_fields_v1(doc) == paths


def test_an_update_takes_what_it_changed_from_others() -> None:
    first = managedfields.record_update(None, deploy(), "creator", DEPLOY)
    second = managedfields.record_update(
        first, deploy(replicas=3) | {"metadata": first["metadata"]}, "scaler", DEPLOY
    )
    owners = {e["manager"]: e["fieldsV1"] for e in second["metadata"]["managedFields"]}
    assert owners["scaler"] == {"f:spec": {"f:replicas": {}}}
    assert "f:replicas" not in owners["creator"]["f:spec"]
    same = managedfields.record_update(second, second, "other", DEPLOY)
    assert same["metadata"]["managedFields"] == second["metadata"]["managedFields"]


def test_apply_conflicts_force_and_removal() -> None:
    live = managedfields.apply(
        None, deploy(labels={"t": "1"}), "a", False, Deployment, "apps/v1", "deployments", "x"
    )
    with pytest.raises(errors.APIError) as e:
        managedfields.apply(
            live, deploy(replicas=5), "b", False, Deployment, "apps/v1", "deployments", "x"
        )
    assert e.value.code == 409 and e.value.details["causes"][0]["field"] == ".spec.replicas"
    # the same value is shared, not a conflict
    shared = managedfields.apply(
        live, deploy(replicas=1), "b", False, Deployment, "apps/v1", "deployments", "x"
    )
    assert shared["spec"]["replicas"] == 1
    forced = managedfields.apply(
        live, deploy(replicas=5), "b", True, Deployment, "apps/v1", "deployments", "x"
    )
    assert forced["spec"]["replicas"] == 5
    # a applies without its label and replicas: the label goes, b's replicas stay
    after = managedfields.apply(
        forced, deploy(replicas=None), "a", False, Deployment, "apps/v1", "deployments", "x"
    )
    assert "t" not in after["metadata"].get("labels", {}) and after["spec"]["replicas"] == 5
