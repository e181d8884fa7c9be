"""Merging a cluster's context into the user's kubeconfig and taking it out again
(cluster/kubeconfig.py), as kind does: other entries untouched, 0600, atomic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from corral.cluster import kubeconfig


def _config(name: str, server: str = "https://10.0.0.1:6443") -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {"token": "t"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    return yaml.safe_dump(doc)


def _names(doc: dict, section: str) -> list[str]:
    return [e["name"] for e in doc.get(section) or []]


def test_user_path_is_first_of_kubeconfig_else_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", f"{os.pathsep}/a/one{os.pathsep}/b/two")
    assert kubeconfig.user_path() == "/a/one"
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", "/home/x")
    assert kubeconfig.user_path() == "/home/x/.kube/config"


def test_merge_creates_the_file_and_folder_0600(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "config"
    assert kubeconfig.merge(_config("corral-a"), str(target)) == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    doc = yaml.safe_load(target.read_text())
    assert doc["current-context"] == "corral-a"
    assert _names(doc, "contexts") == ["corral-a"]
    assert not (tmp_path / "new" / "dir" / "config.lock").exists()


def test_merge_keeps_other_entries_and_replaces_its_own(tmp_path: Path) -> None:
    target = tmp_path / "config"
    other = yaml.safe_load(_config("kind-x", "https://127.0.0.1:1"))
    other["preferences"] = {"colors": True}
    other["extensions"] = [{"name": "e", "extension": {"k": "v"}}]
    target.write_text(yaml.safe_dump(other))
    kubeconfig.merge(_config("corral-a", "https://old:6443"), str(target))
    kubeconfig.merge(_config("corral-a", "https://new:6443"), str(target))
    doc = yaml.safe_load(target.read_text())
    for section in ("clusters", "users", "contexts"):
        assert _names(doc, section) == ["kind-x", "corral-a"]
    assert doc["clusters"][0] == other["clusters"][0]
    assert doc["clusters"][1]["cluster"]["server"] == "https://new:6443"
    assert doc["preferences"] == {"colors": True} and doc["extensions"] == other["extensions"]
    assert doc["current-context"] == "corral-a"

    assert kubeconfig.unmerge("a", str(target))
    doc = yaml.safe_load(target.read_text())
    for section in ("clusters", "users", "contexts"):
        assert _names(doc, section) == ["kind-x"]
    assert doc["current-context"] == ""
    assert not kubeconfig.unmerge("a", str(target))  # nothing left to remove


def test_unmerge_leaves_another_current_context(tmp_path: Path) -> None:
    target = tmp_path / "config"
    kubeconfig.merge(_config("corral-a"), str(target))
    kubeconfig.merge(_config("corral-b"), str(target))
    assert kubeconfig.unmerge("a", str(target))
    doc = yaml.safe_load(target.read_text())
    assert doc["current-context"] == "corral-b"
    assert _names(doc, "contexts") == ["corral-b"]
    assert not kubeconfig.unmerge("zzz", str(tmp_path / "missing"))


def test_a_file_that_is_not_a_kubeconfig_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_text("- just\n- a list\n")
    with pytest.raises(ValueError):
        kubeconfig.merge(_config("corral-a"), str(target))
    assert target.read_text() == "- just\n- a list\n"
    assert not (tmp_path / "config.lock").exists()
