#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see README "Performance"), on the pinned torch. It measures:
#   1. training throughput at 224 px: the model alone vs the full loop (cache -> augment -> step), without and with
#      torch.compile (the gain from compiling);
#   2. inference throughput: the model alone (float32 and bf16) and the scoring path (Scorer.scores, float32);
#   3. `covidcxr reproduce` end to end at 224 px (timed), on $DATA;
#   4. streamed vs in-memory training (benchmarks/bench_scale.py) on synthetic data folders of 10k and 100k images
#      written on the machine: images/s (interleaved in one process) and peak RSS of each path. It needs no $DATA;
#      SCALE_ONLY=1 runs it alone (about 3 minutes): `SCALE_ONLY=1 bash benchmarks/gpu_check.sh`;
# and writes each result, with the device and versions, to $RESULTS (default $OUT/docs/results, so the files come
# back at the path they belong in; copy them into docs/results/). Not run in the session that wrote it.
#
# Expects an ingested data folder at $DATA (default .gpu/data112; a cache.u8.gz is unpacked) and, where the machine
# lacks them, wheels in .whl/. GRID=YAML adds an experiment grid at the end. Time limits: STEP_SECONDS per benchmark (default 300), REPRO_SECONDS (default 540).
set -u
OUT=${OUT:-gpu-out}; DATA=${DATA:-.gpu/data112}; RESULTS=${RESULTS:-$OUT/docs/results}
STEP_SECONDS=${STEP_SECONDS:-300}; REPRO_SECONDS=${REPRO_SECONDS:-540}
mkdir -p "$RESULTS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -f "$DATA/cache.u8.gz" ] && gunzip "$DATA/cache.u8.gz"  # carried compressed to fit the 64 MiB working-tree limit

header() {  # the machine and versions, at the top of every results file
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
  python3 -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
}

run() {  # run NAME TIMEOUT CMD...: output (without progress bars) to $RESULTS/NAME.txt after the header
  local name=$1 limit=$2; shift 2
  { header; echo "command: $*"; } > "$RESULTS/$name.txt"
  timeout "$limit" "$@" 2>&1 | grep -v -e "batch/s" -e "it/s\]" | tee -a "$RESULTS/$name.txt"
  echo "exit: ${PIPESTATUS[0]}" | tee -a "$RESULTS/$name.txt"
}

SCALE=(python3 benchmarks/bench_scale.py --device cuda --sizes 10000 100000 --side 64 --image-size 224 --batch-size 256
       --steps 40 --out "$RESULTS/gpu_scale")
if [ -n "${SCALE_ONLY:-}" ]; then
  run gpu_scale_run "${SCALE_SECONDS:-270}" "${SCALE[@]}"
  ls -l "$RESULTS"
  exit 0
fi

TRAIN=(python3 benchmarks/bench_train.py "$DATA" --device cuda --batch-size 1024 --image-size 224 --steps 30 --epochs 8)
run gpu_train_224 "$STEP_SECONDS" "${TRAIN[@]}"
run gpu_train_224_compile "$STEP_SECONDS" "${TRAIN[@]}" --compile
run gpu_infer_224 "$STEP_SECONDS" python3 benchmarks/bench_infer.py --device cuda --image-size 224 --images 32768
run gpu_scale_run "${SCALE_SECONDS:-270}" "${SCALE[@]}"

REPRO=(python3 -m covidcxr.cli reproduce --data "$DATA" --out "$OUT/reproduce" --device cuda --image-size 224)
start=$(date +%s)
run gpu_reproduce "$REPRO_SECONDS" "${REPRO[@]}"
echo "wall: $(( $(date +%s) - start )) s" | tee -a "$RESULTS/gpu_reproduce.txt"
cp "$OUT/reproduce/summary.md" "$RESULTS/gpu_reproduce_summary.md" 2>/dev/null
if [ -n "${GRID:-}" ]; then  # opt-in: a mitigation grid, e.g. GRID=benchmarks/experiments/preprocessing.yaml
  run gpu_grid "${GRID_SECONDS:-400}" python3 -m covidcxr.cli experiment "$GRID" --data "$DATA" --out "$OUT/exp"
fi
ls -l "$RESULTS"
