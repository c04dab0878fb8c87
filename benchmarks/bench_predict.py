"""Single-image prediction latency on a CPU: `Predictor.predict_paths([one 512 px PNG])`, decode included.

    python benchmarks/bench_predict.py [RUN] [--image PATH] [--calls 30] [--warmup 3] [--threads 1 2]

Without RUN, a random-weights gray AlexNet run is written to a temporary folder at the default training settings
(input side and cache size), which is what the latency depends on, not the weights. Each --threads setting (torch
intra-op threads, as `covidcxr predict --threads` sets them) is timed in turn against the target: a median under
20 ms per image at any thread setting on an idle machine. The report also goes to docs/results/bench_predict.txt.
On a machine that other processes keep busy, one thread is faster than two: each parallel op then waits for a core
at every OpenMP barrier.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_serve import RESULTS, SHARED_NOTE, chest_like_png, machine, write_random_run

TARGET_MS = 20.0


def latencies_ms(fn, calls: int, warmup: int) -> np.ndarray:
    """Wall time of `calls` calls of fn() after `warmup` untimed ones (first-call allocations, oneDNN kernel choice)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1000


def summary(name: str, ms: np.ndarray) -> str:
    return f"{name}: median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, min {ms.min():.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run folder (default: a random-weights run at the default settings)")
    parser.add_argument("--image", type=Path, help="image to score (default: a synthetic 512 px PNG)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per setting (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="settings to time (default 1 2)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_predict.txt", help="report (default %(default)s)")
    args = parser.parse_args(argv)

    from covidcxr.data.reader import read_image
    from covidcxr.deploy.predict import Predictor, use_threads

    lines = [machine()]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else write_random_run(Path(tmp) / "random-run")
        image = args.image or Path(tmp) / "chest-512.png"
        if not args.image:
            image.write_bytes(chest_like_png(512))
        predictor = Predictor.from_run(run, device="cpu")
        result = predictor.predict_paths([image])[0]
        if result.error:
            print(f"bench_predict: cannot score {image}: {result.error}", file=sys.stderr)
            return 1
        pre = predictor.spec.preprocess
        lines.append(f"model {predictor.model_id} ({predictor.spec.arch}, input {pre.image_size} px, cache "
                     f"{pre.cache_size} px), image {image.name}, {args.calls} calls after {args.warmup} warm-up")
        print("\n".join(lines), flush=True)
        for threads in args.threads:
            use_threads(threads)
            total = latencies_ms(lambda: predictor.predict_paths([image]), args.calls, args.warmup)
            decode = latencies_ms(lambda: predictor.square(read_image(image)), args.calls, args.warmup)
            met = "met" if np.median(total) < TARGET_MS else "NOT met"
            block = (f"--threads {threads}: {summary('predict_paths (decode + square + model)', total)}\n"
                     f"  {summary('of which decode + square', decode)}\n  target median < {TARGET_MS:.0f} ms: {met}")
            print(block, flush=True)
            lines.append(block)
    lines.append(SHARED_NOTE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{SHARED_NOTE}\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
