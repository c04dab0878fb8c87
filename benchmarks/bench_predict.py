"""Single-image prediction latency on a CPU: `Predictor.predict_paths([one 512 px PNG])`, decode included.

    python benchmarks/bench_predict.py [RUN] [--image PATH] [--calls 30] [--warmup 3] [--threads N]

Without RUN, a random-weights gray AlexNet run is written to a temporary folder at the default training settings
(input side and cache size), which is what the latency depends on, not the weights. The design's target is
"tens of milliseconds" per 512 px PNG on a CPU. On a machine that other processes keep busy, one thread is faster
than two: each parallel op then waits for a core at every OpenMP barrier (--threads 1 shows it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_serve import chest_like_png, write_random_run


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
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from covidcxr.config import IngestConfig, TrainConfig
    from covidcxr.deploy.predict import Predictor
    from covidcxr.data.reader import read_image

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else write_random_run(
            Path(tmp) / "random-run", image_size=TrainConfig().image_size, cache_size=IngestConfig().size)
        image = args.image or Path(tmp) / "chest-512.png"
        if not args.image:
            image.write_bytes(chest_like_png(512))
        predictor = Predictor.from_run(run, device="cpu")
        result = predictor.predict_paths([image])[0]
        if result.error:
            print(f"bench_predict: cannot score {image}: {result.error}", file=sys.stderr)
            return 1
        total = latencies_ms(lambda: predictor.predict_paths([image]), args.calls, args.warmup)
        decode = latencies_ms(lambda: predictor.preprocess(read_image(image)), args.calls, args.warmup)
    meta = predictor.meta
    print(f"model {predictor.model_id} ({meta['arch']}, input {meta['image_size']} px, cache {meta['cache_size']} px), "
          f"image {image.name}, CPU threads {torch.get_num_threads()}, {args.calls} calls after {args.warmup} warm-up")
    print(summary("predict_paths (decode + resize + model)", total))
    print(summary("  of which decode + resize", decode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
