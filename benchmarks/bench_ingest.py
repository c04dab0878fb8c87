"""Ingest throughput on the real chest X-rays, then how fast the cache feeds images back.

    python benchmarks/bench_ingest.py [--data ../shared/cxr] [--workers 0] [--size 256] [--batches 300] [--keep DIR]

Ingests the whole folder into a temporary data folder on all cores (decode, hash, square, resize: each file once) and
prints images/s; then reads the cache: the whole kept set into memory (as training loads it), and random batches of
64 straight from the memory map and from memory. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidcxr.config import IngestConfig
from covidcxr.data.cache import ImageCache
from covidcxr.data.ingest import ingest
from covidcxr.data.manifest import find_duplicates

BATCH = 64


def default_data() -> Path:
    """../shared/cxr beside the repository, or $COVIDCXR_SHARED: where the real X-rays are kept."""
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("COVIDCXR_SHARED", repo.parent / "shared" / "cxr"))


def bench_ingest(data: Path, out: Path, cfg: IngestConfig) -> None:
    """Time a first ingest, the duplicate search alone, and a re-ingest that must decode nothing."""
    start = time.perf_counter()
    report = ingest([data], out, cfg)
    seconds = time.perf_counter() - start
    print(f"ingest: {report.processed} images decoded in {seconds:.1f} s with {cfg.workers or os.cpu_count()} "
          f"worker(s): {report.processed / seconds:.1f} images/s  (kept {report.kept}, duplicates "
          f"{report.duplicates}, unreadable {len(report.unreadable)})")
    manifest = ImageCache(out).manifest(include_duplicates=True)
    start = time.perf_counter()
    find_duplicates(manifest, cfg.near_duplicate_corr, cfg.conflict_duplicate_corr)
    print(f"  duplicate search over {len(manifest)} images (once per save): {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    again = ingest([data], out, cfg)
    print(f"re-ingest (nothing changed): {again.processed} decoded, {again.reused} reused in "
          f"{time.perf_counter() - start:.1f} s")


def _batches_per_s(what: str, take: Callable[[Any], Any], picks: list[Any]) -> None:
    """Time `take` over the given random picks and print batches of BATCH images per second."""
    start = time.perf_counter()
    for pick in picks:
        batch = take(pick)
    seconds = time.perf_counter() - start
    assert batch.shape[0] == BATCH and batch.dtype in (torch.uint8, np.uint8)
    print(f"{what}: {len(picks)} random batches of {BATCH} in {seconds:.3f} s: "
          f"{len(picks) * BATCH / seconds:,.0f} images/s")


def bench_read(out: Path, batches: int, seed: int = 0) -> None:
    """How fast the cache feeds training: the kept set into memory once, then random batches by each route."""
    cache = ImageCache(out)
    df = cache.manifest()
    start = time.perf_counter()
    images = cache.load(df["cache_index"])
    seconds = time.perf_counter() - start
    print(f"into memory (ImageCache.load): {len(images)} images of {cache.size}x{cache.size} in {seconds:.3f} s: "
          f"{len(images) / seconds:,.0f} images/s")
    rng = np.random.default_rng(seed)
    slots = df["cache_index"].to_numpy()
    _batches_per_s("memory map (ImageCache.load)", cache.load,
                   [rng.choice(slots, BATCH, replace=False) for _ in range(batches)])
    rows = [torch.from_numpy(rng.choice(len(images), BATCH, replace=False)) for _ in range(batches)]
    _batches_per_s("in memory, torch indexing (as train.py does)", lambda r: images[r], rows)
    in_memory = images.numpy()
    _batches_per_s("in memory, numpy indexing", lambda r: in_memory[r.numpy()], rows)


def main(argv: list[str] | None = None) -> int:
    """Ingest the real X-rays into a temporary (or --keep) folder and time reading them back."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data(), help="database folder (generic CSV layout)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    parser.add_argument("--size", type=int, default=256, help="cached image side")
    parser.add_argument("--batches", type=int, default=300, help="random batches to read back")
    parser.add_argument("--keep", type=Path, help="write the data folder here instead of a temporary one")
    args = parser.parse_args(argv)
    if not (args.data / "metadata.csv").is_file():
        print(f"bench_ingest: no data at {args.data} (set COVIDCXR_SHARED or --data); nothing to measure")
        return 0
    print(f"data: {args.data}  cores: {os.cpu_count()}  cache side: {args.size}")
    cfg = IngestConfig(size=args.size, workers=args.workers)
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        out = args.keep or Path(tmp) / "data"
        bench_ingest(args.data, out, cfg)
        bench_read(out, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
