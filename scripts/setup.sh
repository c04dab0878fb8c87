#!/usr/bin/env bash
# Set up everything covidcxr needs on a fresh machine (idempotent): a virtual environment with the package and its
# pinned dependencies, and, for the browser test, Debian's Chromium (skipped with a message where it cannot be had).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
if [ "${COVIDCXR_NO_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium not installed and apt-get unavailable; the browser test will be skipped" >&2
  fi
fi
