#!/usr/bin/env bash
# The whole suite: lint, then pytest. Exit status is non-zero when anything
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

"$VENV/bin/python" -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "run-tests: pytest collected no tests (exit 5); treating that as a failure" >&2
  exit 1
fi
exit $rc
