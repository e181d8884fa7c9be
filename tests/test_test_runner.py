"""`make test`'s runner: a failing test fails the run, and so does a run that ran nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "scripts" / "run-tests.sh"


def run_suite(tmp_path: Path, body: str, *extra: str) -> subprocess.CompletedProcess:
    test = tmp_path / "test_sample.py"
    test.write_text(body)
    env = dict(os.environ, CORRAL_VENV=str(Path(sys.executable).parent.parent), CORRAL_LINT="0")
    return subprocess.run(
        [str(RUNNER), str(test), "-p", "no:cacheprovider", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_failing_test_makes_the_run_fail(tmp_path: Path) -> None:
    r = run_suite(tmp_path, "def test_broken():\n    assert 1 == 2\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout


def test_no_tests_collected_is_a_failure_not_a_pass(tmp_path: Path) -> None:
    r = run_suite(tmp_path, "def helper():\n    pass\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "collected no tests" in r.stderr


def test_passing_tests_pass(tmp_path: Path) -> None:
    r = run_suite(tmp_path, "def test_ok():\n    assert True\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
