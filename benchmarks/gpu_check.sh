#!/usr/bin/env bash
# One prepared script for a lent GPU machine (see README "GPU checks"): training throughput (model-only vs full loop)
# and the cross-source mitigation grid. Expects an ingested data folder at $DATA (default .gpu/data112) and, where
# the machine lacks them, wheels in .whl/ (pydicom, imagehash, PyWavelets, kornia, kornia_rs), and for the
# preprocessing grid's lung crop a lung model at .gpu/lungs.pt (see preprocessing.yaml). GRID picks the grid.
# Writes under $OUT (default ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; DATA=${DATA:-.gpu/data112}; GRID_SECONDS=${GRID_SECONDS:-400}; BENCH=${BENCH:-1}
GRID=${GRID:-benchmarks/experiments/preprocessing.yaml}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
[ -f "$DATA/cache.u8.gz" ] && gunzip "$DATA/cache.u8.gz"  # carried compressed to fit the 64 MiB working-tree limit
if [ "$BENCH" = 1 ]; then  # BENCH=0 skips the throughput benchmark (its figures are in docs/experiments)
  python3 benchmarks/bench_train.py "$DATA" --device cuda --batch-size 1024 --image-size 224 --steps 30 --epochs 8 2>&1 \
    | grep -v "batch/s" | tee "$OUT/bench_train.txt"
fi
timeout "$GRID_SECONDS" python3 -m covidcxr.cli experiment "$GRID" --data "$DATA" \
  --out "$OUT/exp" 2>&1 | grep -v "batch/s" | grep -v "^epoch" | tail -20
ls "$OUT/exp"; cat "$OUT/exp/summary.md" 2>/dev/null || tail -5 "$OUT/exp/results.csv"
