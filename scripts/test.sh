#!/usr/bin/env bash
# The whole test suite, after the same idempotent set-up as the demo. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${IMGQ_VENV:-.venv}/bin/python" -m pytest "$@"
