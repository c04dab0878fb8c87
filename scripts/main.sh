#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the paper's experiment end to end on ../shared/cxr (or $DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
COVIDCXR_NO_BROWSER=1 bash scripts/setup.sh
exec .venv/bin/covidcxr reproduce --data "${DATA:-../shared/cxr}" --out "${OUT:-reproduce}" "$@"
