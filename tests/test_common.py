"""The bottom package (`corral.common`): atomic writes and the cached C build."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from corral.common.files import write_atomic
from corral.common.native import build_cached


def test_atomic_write_replaces_with_the_mode_asked_and_leaves_no_temp(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    key.write_text("old")
    key.chmod(0o644)
    write_atomic(str(key), b"secret", 0o600)
    assert key.read_bytes() == b"secret"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # narrowed, not inherited
    write_atomic(str(tmp_path / "a" / "b.json"), "{}\n", make_dirs=True)
    assert stat.S_IMODE((tmp_path / "a" / "b.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "node.key"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "dir"), "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_a_c_helper_is_built_once_per_source_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "hello.c"
    src.write_text("int main(void) { return HELLO; }\n")
    first = build_cached(str(src), "hello", ["-DHELLO=0"])
    assert os.access(first, os.X_OK)
    built_at = os.stat(first).st_mtime_ns
    assert build_cached(str(src), "hello", ["-DHELLO=0"]) == first
    assert os.stat(first).st_mtime_ns == built_at  # found, not rebuilt
    assert build_cached(str(src), "hello", ["-DHELLO=1"]) != first  # other flags: other file
    src.write_text("int main(void) { return nope; }\n")
    with pytest.raises(RuntimeError, match=r"hello\.c"):
        build_cached(str(src), "hello")
    assert not [p for p in (tmp_path / "cache" / "corral").iterdir() if p.name.startswith(".")]
