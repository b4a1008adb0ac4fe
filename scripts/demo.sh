#!/usr/bin/env bash
# The whole product end to end: sample data -> training -> Redis + two workers ->
# 1,000 classifications -> a drifted stream -> a drift alert and report. Arguments go to `imgq demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
IMGQ_SKIP_COMPOSE=1 bash scripts/setup.sh
exec "${IMGQ_VENV:-.venv}/bin/imgq" demo "$@"
