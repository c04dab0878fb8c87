#!/usr/bin/env bash
# The quick loop: every test not marked slow (no training beyond the shared tiny run, no covidcxr subprocesses or
# servers, no browser or PACS, nothing long), on this checkout's code. Writes docs/results/quick_loop.txt: the
# wall-clock seconds, pytest's summary line, the machine, its load and the date. Sets up .venv (scripts/setup.sh) only
# where it is missing; extra arguments go to pytest. The whole suite, scripts/test.sh, stays what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out=docs/results/quick_loop.txt
log=$(mktemp)
trap 'rm -f "$log"' EXIT
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
start=$(date +%s.%N)
status=0
.venv/bin/python -m pytest -q -m "not slow" "$@" 2>&1 | tee "$log" || status=$?
end=$(date +%s.%N)
load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)
summary=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$log" | tail -n 1 \
  | sed -E 's/^=+ //; s/ =+$//')
mkdir -p "$(dirname "$out")"
{
  echo "command: .venv/bin/python -m pytest -q -m \"not slow\"${*:+ $*} (bash scripts/quick.sh)"
  echo "wall-clock seconds: $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')"
  echo "pytest summary: ${summary:-none found in its output}"
  echo "machine: $(nproc) CPU cores (nproc), $(uname -m)"
  echo "load average (1, 5, 15 min) before: $load_before; after: $load_after"
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
} > "$out"
echo "quick loop: wrote $out"
cat "$out"
exit "$status"
