#!/usr/bin/env bash
# The whole test suite, after the same idempotent set-up as the demo plus chromium (the review
# page's browser test): first the linter, the formatter check and the type checker (any finding
# fails the run), then pytest. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Also promtool and amtool for tests/test_alerting.py (IMGQ_SETUP_ALERTING=0: skip them).
IMGQ_SETUP_ALERTING="${IMGQ_SETUP_ALERTING:-1}" bash scripts/setup.sh --browser
PY="${IMGQ_VENV:-.venv}/bin/python"
echo "test: ruff check, ruff format --check, mypy"
"$PY" -m ruff check --quiet .
"$PY" -m ruff format --check --quiet .
"$PY" scripts/typecheck.py
exec "$PY" -m pytest "$@"
