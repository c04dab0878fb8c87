#!/usr/bin/env bash
# Set up everything covidcxr needs on a fresh machine (idempotent): a virtual environment with the package and its
# pinned dependencies; for the browser test, Debian's Chromium, and for the PACS tests, Debian's Orthanc with its
# DICOMweb plugin (each skipped with a message where it cannot be had; under CI=true the PACS tests then fail).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
# apt_install WHAT PACKAGE...: Debian packages, installed where this runs as root; else a line on what is skipped
apt_install() {
  local what=$1
  shift
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null) \
      || echo "setup: could not install $*; $what will be skipped" >&2
  else
    echo "setup: $* not installed and apt-get unavailable; $what will be skipped" >&2
  fi
}
have_orthanc() {
  { command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null 2>&1 \
    && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1
}
if [ "${COVIDCXR_NO_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  apt_install "the browser test" chromium
fi
if [ "${COVIDCXR_NO_PACS:-0}" != 1 ] && ! have_orthanc; then
  apt_install "the PACS tests (they fail under CI=true)" orthanc orthanc-dicomweb
fi
