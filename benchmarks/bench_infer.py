"""Inference throughput on one device: the model alone on a batch already there vs the scoring path (`Scorer.scores`:
cached uint8 squares -> preprocessing -> float32 model -> probabilities), as evaluate and batched serving use it.

    python benchmarks/bench_infer.py [RUN] [--device auto] [--images 16384] [--batch-size 1024]

Without RUN, a random-weights gray AlexNet at --image-size (default 224) is used. Prints images/s for both, in
float32 (how covidcxr scores) and, for the model alone, under bf16 autocast (the design's ~85,000 images/s on an H200).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_serve import write_random_run


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call after two warm-up calls."""
    fn(), fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run folder (default: a random-weights run)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--image-size", type=int, default=224, help="input side of the random run (default 224)")
    parser.add_argument("--images", type=int, default=16384, help="squares scored per timed call (default 16384)")
    parser.add_argument("--batch-size", type=int, default=1024, help="model-only batch (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
    args = parser.parse_args(argv)

    from covidcxr.device import autocast
    from covidcxr.scoring import Scorer

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else write_random_run(Path(tmp) / "run", image_size=args.image_size)
        scorer = Scorer.from_run(run, args.device)
    dev, pre = scorer.device, scorer.spec.preprocess
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    squares = np.random.default_rng(0).integers(0, 256, (args.images, pre.cache_size, pre.cache_size), dtype=np.uint8)
    x = torch.rand(args.batch_size, 1, pre.image_size, pre.image_size, device=dev).contiguous(
        memory_format=torch.channels_last)
    model = scorer.model.eval()

    def model_only(amp: bool) -> None:
        with torch.no_grad(), autocast(dev, amp):
            model(x)

    fp32 = args.batch_size / timed(lambda: model_only(False), dev, args.repeats)
    bf16 = args.batch_size / timed(lambda: model_only(True), dev, args.repeats)
    path = args.images / timed(lambda: scorer.scores(squares), dev, args.repeats)
    print(f"device: {name}; torch {torch.__version__}; input {pre.image_size} px, cache {pre.cache_size} px")
    print(f"model only, batch {args.batch_size}: {fp32:12,.0f} images/s float32, {bf16:12,.0f} images/s bf16 autocast")
    print(f"Scorer.scores ({args.images} cached squares, preprocessing included, float32): {path:12,.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
