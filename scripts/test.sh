#!/usr/bin/env bash
# The whole test suite: lint, type check of the core, unit and functional
# tests (the functional ones build real network namespaces, so run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff" && .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy (core)" && .venv/bin/mypy vmm_orchestrator
echo "== pytest"
set +e
.venv/bin/python -m pytest -p no:cacheprovider -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
