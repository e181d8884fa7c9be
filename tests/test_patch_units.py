"""The patch types `corral patch` takes, on plain documents (pure logic)."""

from __future__ import annotations

import copy

import pytest

from corral.api.objects import Pod, Service
from corral.api.patch import PatchError, json_patch, merge_patch, parse_patch, strategic_merge

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "p", "labels": {"a": "1"}, "finalizers": ["x"]},
    "spec": {
        "containers": [
            {"name": "one", "command": ["a"], "env": [{"name": "K", "value": "v"}]},
            {"name": "two", "command": ["b"], "ports": [{"containerPort": 80}]},
        ]
    },
}


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}
    patch = {"a": "z", "c": {"f": None}, "l": [3]}
    assert merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}, "l": [3]}
    assert target["c"] == {"d": "e", "f": "g"}  # the input is left alone
    assert merge_patch({"a": 1}, ["x"]) == ["x"]


def test_json_patch_operations_all_or_none() -> None:
    doc = {"spec": {"list": [1, 2], "k": "v"}}
    out = json_patch(
        doc,
        [
            {"op": "add", "path": "/spec/list/-", "value": 3},
            {"op": "add", "path": "/spec/list/0", "value": 0},
            {"op": "copy", "from": "/spec/k", "path": "/spec/k2"},
            {"op": "move", "from": "/spec/k", "path": "/spec/moved"},
            {"op": "replace", "path": "/spec/k2", "value": "w"},
            {"op": "remove", "path": "/spec/list/1"},
            {"op": "test", "path": "/spec/moved", "value": "v"},
            {"op": "add", "path": "/a~1b", "value": 1},
        ],
    )
    assert out == {"spec": {"list": [0, 2, 3], "k2": "w", "moved": "v"}, "a/b": 1}
    before = copy.deepcopy(doc)
    with pytest.raises(PatchError, match="operation 1 \\(test /spec/k\\)"):
        json_patch(
            doc,
            [
                {"op": "add", "path": "/x", "value": 1},
                {"op": "test", "path": "/spec/k", "value": "no"},
            ],
        )
    assert doc == before
    for ops, msg in (
        ([{"op": "remove", "path": "/spec/nope"}], "'nope' does not exist"),
        ([{"op": "replace", "path": "/spec/list/5", "value": 1}], "out of range"),
        ([{"op": "add", "path": "spec", "value": 1}], "starts with '/'"),
        ([{"op": "frob", "path": "/spec"}], "unknown op 'frob'"),
        ({"op": "add"}, "a list of operations"),
    ):
        with pytest.raises(PatchError, match=msg):
            json_patch(doc, ops)


def test_strategic_merge_merges_named_lists_by_key() -> None:
    patch = {
        "metadata": {"labels": {"b": "2"}, "finalizers": ["y", "x"]},
        "spec": {
            "containers": [
                {
                    "name": "two",
                    "ports": [{"containerPort": 81}],
                    "env": [{"name": "E", "value": "1"}],
                },
                {"name": "three", "command": ["c"]},
                {"name": "one", "env": [{"name": "K", "$patch": "delete"}]},
            ]
        },
    }
    out = strategic_merge(copy.deepcopy(POD), patch, Pod)
    assert out["metadata"]["labels"] == {"a": "1", "b": "2"}
    assert out["metadata"]["finalizers"] == ["x", "y"]  # a set, not a list replaced
    one, two, three = out["spec"]["containers"]
    assert (one["name"], two["name"], three["name"]) == ("one", "two", "three")
    assert one["env"] == [] and one["command"] == ["a"]
    assert two["ports"] == [{"containerPort": 80}, {"containerPort": 81}]
    assert Pod.model_validate(out).spec.containers[1].env[0].name == "E"

    replaced = strategic_merge(
        copy.deepcopy(POD),
        {"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "command": ["z"]}]}},
        Pod,
    )
    assert [c["name"] for c in replaced["spec"]["containers"]] == ["only"]

    svc = {"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}}
    out = strategic_merge(svc, {"spec": {"ports": [{"port": 443, "targetPort": 8443}]}}, Service)
    assert out["spec"]["ports"][1] == {"port": 443, "name": "https", "targetPort": 8443}


def test_strategic_merge_errors_name_the_path() -> None:
    with pytest.raises(
        PatchError, match=r"spec.containers\[0\]: each item needs its merge key 'name'"
    ):
        strategic_merge(copy.deepcopy(POD), {"spec": {"containers": [{"image": "x"}]}}, Pod)
    with pytest.raises(PatchError, match=r"spec.\$frob: unknown patch directive"):
        strategic_merge(copy.deepcopy(POD), {"spec": {"$frob": 1}}, Pod)
    # an unknown field is kept, for the model's validation to name
    assert strategic_merge({}, {"spec": {"typo": 1}}, Pod) == {"spec": {"typo": 1}}


def test_parse_patch_takes_json_or_yaml() -> None:
    assert parse_patch('{"a": 1}') == {"a": 1}
    assert parse_patch("a: 1\nb: [x]") == {"a": 1, "b": ["x"]}
    with pytest.raises(PatchError, match="neither JSON nor YAML"):
        parse_patch("a: [")


def test_every_merge_key_names_a_list_the_model_has() -> None:
    from corral.api import objects
    from corral.api.fields import field_named, is_list
    from corral.api.patch import MERGE_KEYS, SET_LISTS

    for model_name, field in [*MERGE_KEYS, *SET_LISTS]:
        found = field_named(getattr(objects, model_name), field)
        assert found is not None and is_list(found[1].annotation), (model_name, field)
