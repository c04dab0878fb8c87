"""`covidcxr monitor` on a long synthetic prediction log: how long the whole command takes (target: under 30 s for
100,000 predictions), and the synthetic log the monitor tests use.

    python benchmarks/bench_monitor.py [--predictions 100000] [--window 7d]

The log is written through covidcxr's own PredictionLog schema: one model whose validation scores are Beta(2, 2),
predictions a few minutes apart, 2 % not scored (two reasons), and a reader's verdict on a share of them. After
`shift_at` the scores come from Beta(8, 1) (a planted shift); after `disagree_from` readers disagree with the model
on `high` of the verdicts instead of `low`. Writes docs/results/bench_monitor.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TARGET_S = 30.0
MODEL, THRESHOLD = "run-synthetic", 0.5
REASONS = (("unreadable", "upload.png: image file is truncated or corrupt"),
           ("refused", "not a chest radiograph: Modality CT"))


def synthetic_log(path: Path, n: int, shift_at: int | None = None, disagree_from: int | None = None,
                  verdict_share: float = 0.3, low: float = 0.1, high: float = 0.4, minutes: float = 5.0,
                  seed: int = 0) -> Path:
    """A prediction log of n predictions (see the module docstring) at `path`; returns it."""
    sys.path.insert(0, str(ROOT / "src"))
    from covidcxr.deploy.serve.log import PredictionLog

    rng = np.random.default_rng(seed)
    plog = PredictionLog(path)
    plog.record_model(MODEL, THRESHOLD, "covid", rng.beta(2, 2, 400), expected_disagreement=low)
    plog.close()
    idx = np.arange(n)
    shifted = idx >= (n if shift_at is None else shift_at)
    scores = np.where(shifted, rng.beta(8, 1, n), rng.beta(2, 2, n))
    start = datetime(2026, 1, 5, tzinfo=timezone.utc)
    times = [(start + timedelta(minutes=float(m))).isoformat(timespec="milliseconds") for m in idx * minutes]
    kinds = rng.random(n)
    status = np.where(kinds < 0.01, REASONS[0][0], np.where(kinds < 0.02, REASONS[1][0], "scored"))
    reason = np.where(kinds < 0.01, REASONS[0][1], np.where(kinds < 0.02, REASONS[1][1], None))
    called = scores >= THRESHOLD
    rows = [(int(i) + 1, times[i], f"{i:064x}", f"img{i}.png", None if status[i] != "scored" else float(scores[i]),
             None if status[i] != "scored" else ("covid" if called[i] else "normal"), THRESHOLD, MODEL,
             str(status[i]), reason[i], f"p{i}", "serve") for i in idx]
    disagree_rate = np.where(idx >= (n if disagree_from is None else disagree_from), high, low)
    disagree = rng.random(n) < disagree_rate
    judged = (rng.random(n) < verdict_share) & (status == "scored")
    verdicts = [(int(i) + 1, times[i], "normal" if called[i] == disagree[i] else "covid", "dr-synthetic", None,
                 "api") for i in idx[judged]]
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO predictions (id, time_utc, sha256, filename, probability, label, threshold, "
                         "model_id, status, reason, patient_id, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         rows)
        conn.executemany("INSERT INTO verdicts (prediction_id, time_utc, label, reader, comment, origin) "
                         "VALUES (?, ?, ?, ?, ?, ?)", verdicts)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=100_000, help="log length (default 100000)")
    parser.add_argument("--window", nargs="+", default=["7d", "100"], help="monitor --window settings to time "
                        "(default 7d 100)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_monitor.txt", help="report file")
    args = parser.parse_args(argv)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [f"machine: {platform.node()}, {cpu}, {os.cpu_count()} cores, load average {load} (1, 5, 15 min)",
             f"synthetic log: {args.predictions:,} predictions 5 min apart, 30 % with a verdict, scores shifted from "
             f"prediction {args.predictions // 2:,}, readers' disagreement 10 % -> 40 % from "
             f"{3 * args.predictions // 4:,}"]
    with tempfile.TemporaryDirectory() as tmp:
        db = synthetic_log(Path(tmp) / "log.sqlite", args.predictions, shift_at=args.predictions // 2,
                           disagree_from=3 * args.predictions // 4)
        for window in args.window:
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "covidcxr.cli", "monitor", str(db), "--out",
                                   f"{tmp}/monitor", "--window", window], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            seconds = time.perf_counter() - t0
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return 1
            lines.append(f"covidcxr monitor --window {window}: {seconds:.1f} s for the whole command, process start "
                         f"and every file included (target under {TARGET_S:.0f} s: "
                         f"{'met' if seconds < TARGET_S else 'NOT met'}); it printed:")
            lines += [f"  {line}" for line in done.stdout.strip().splitlines() if "written to" not in line]
    from bench_serve import write_report  # here: the tests load this file as a module without benchmarks/ on the path

    print("\n".join(lines))
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
