#!/usr/bin/env bash
# The whole suite: lint, then pytest on CORRAL_TEST_WORKERS (default 4) workers. Exit status is non-zero when anything
# fails, and also when pytest collected nothing (its exit 5): a suite that ran
# no test has not shown anything works.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CORRAL_VENV:-$ROOT/.venv}"
cd "$ROOT"

if [[ ${CORRAL_LINT:-1} != 0 ]]; then
  # The same lint as `make lint`: rules, then formatting.
  "$VENV/bin/ruff" check . || { echo "run-tests: ruff found problems" >&2; exit 1; }
  "$VENV/bin/ruff" format --check . || { echo "run-tests: run 'ruff format .'" >&2; exit 1; }
fi

# Parallel by default (pytest-xdist): most of the suite waits on etcd, daemons and
# the kernel, so more workers than cores pay off. CORRAL_TEST_WORKERS=0 runs it
# serially; a later `-n` in the arguments wins over this one. How tests are grouped
# onto workers: conftest.py.
"$VENV/bin/python" -m pytest -n "${CORRAL_TEST_WORKERS:-4}" --dist loadgroup --no-loadscope-reorder "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "run-tests: pytest collected no tests (exit 5); treating that as a failure" >&2
  exit 1
fi
exit $rc
