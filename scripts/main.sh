#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the paper's experiment end to end on ../shared/cxr (or $DATA), every
# run's gate also shown the lateral films and CT slices of ../shared/cxr-nonfrontal (or $GATE_NEGATIVES) when present.
# Then the job's text results (no images, no per-image rows) are copied into docs/results/reproduce/, where the
# README's tables come from, with the wall-clock time of the job.
set -euo pipefail
cd "$(dirname "$0")/.."
COVIDCXR_NO_BROWSER=1 COVIDCXR_NO_PACS=1 bash scripts/setup.sh
out=${OUT:-reproduce}
start=$(date +%s)
negatives=${GATE_NEGATIVES:-../shared/cxr-nonfrontal}  # lateral films and CT slices for the gates to refuse
gate_args=()
if [ -d "$negatives" ]; then gate_args=(--gate-negatives "$negatives"); fi
.venv/bin/covidcxr reproduce --data "${DATA:-../shared/cxr}" --out "$out" "${gate_args[@]}" "$@"
seconds=$(( $(date +%s) - start ))
results=docs/results/reproduce
mkdir -p "$results"
cp "$out/summary.md" "$out/trust.md" "$out/trust.csv" "$out/calibrate.csv" "$out/triage.csv" "$out/training.csv" \
  "$out/alarm.md" "$out/alarm_power.csv" "$out/alarm_stream.csv" "$results/"
cp "$out/main/report/metrics.json" "$results/main_metrics.json"
cp "$out/main/run/history.csv" "$results/main_history.csv"
cp "$out/main/run/gate.json" "$results/main_gate.json"
rm -f "$results/main_guard.json"  # the member guard is opt-in (--guard): its file is copied only when there is one
[ -f "$out/main/run/guard.json" ] && cp "$out/main/run/guard.json" "$results/main_guard.json"
cp "$out/main/report/diagnose/verdict.md" "$results/main_diagnose_verdict.md"
for report in "$out"/external/*/report; do
  fold=$(basename "$(dirname "$report")")
  cp "$report/metrics.json" "$results/external_${fold}_metrics.json"
  cp "$out/external/$fold/run/history.csv" "$results/external_${fold}_history.csv"
done
printf 'covidcxr reproduce on %s: %d s wall clock (%s, %s cores)\n' "${DATA:-../shared/cxr}" "$seconds" \
  "$(uname -m)" "$(nproc)" > "$results/runtime.txt"
echo "results copied to $results ($seconds s)"
