"""Ingest throughput on the real chest X-rays, then how fast the cache feeds images back.

    python benchmarks/bench_ingest.py [--data ../shared/cxr] [--workers 0] [--size 256] [--batches 300] [--keep DIR]

Ingests the whole folder into a temporary data folder on all cores (decode, hash, square, resize: each file once) and
prints images/s; then reads the cache: the whole kept set into memory as a CachedDataset, and random batches of 64
straight from the memory map. Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from covidcxr.data.cache import CachedDataset, ImageCache
from covidcxr.config import IngestConfig
from covidcxr.data.ingest import ingest
from covidcxr.data.manifest import find_duplicates
from covidcxr.data.tasks import encode

BATCH = 64


def default_data() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("COVIDCXR_SHARED", repo.parent / "shared" / "cxr"))


def bench_ingest(data: Path, out: Path, cfg: IngestConfig) -> None:
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


def _batches_per_s(what: str, take, picks: list[np.ndarray]) -> None:
    start = time.perf_counter()
    for pick in picks:
        batch = take(pick)
    seconds = time.perf_counter() - start
    assert batch.shape[0] == BATCH and batch.dtype in (torch.uint8, np.uint8)
    print(f"{what}: {len(picks)} random batches of {BATCH} in {seconds:.3f} s: "
          f"{len(picks) * BATCH / seconds:,.0f} images/s")


def bench_read(out: Path, batches: int, seed: int = 0) -> None:
    cache = ImageCache(out)
    df = cache.manifest()
    start = time.perf_counter()
    dataset = CachedDataset(cache, df["cache_index"], np.maximum(encode(df["label"], "covid-vs-rest"), 0))
    seconds = time.perf_counter() - start
    print(f"CachedDataset: {len(dataset)} images of {cache.size}x{cache.size} into memory in {seconds:.3f} s: "
          f"{len(dataset) / seconds:,.0f} images/s")
    rng = np.random.default_rng(seed)
    slots = df["cache_index"].to_numpy()
    _batches_per_s("memory map (ImageCache.load)", cache.load,
                   [rng.choice(slots, BATCH, replace=False) for _ in range(batches)])
    rows = [torch.from_numpy(rng.choice(len(dataset), BATCH, replace=False)) for _ in range(batches)]
    _batches_per_s("in memory, torch indexing (as train.py does)", lambda r: dataset.images[r], rows)
    in_memory = dataset.images.numpy()
    _batches_per_s("in memory, numpy indexing", lambda r: in_memory[r.numpy()], rows)


def main(argv: list[str] | None = None) -> int:
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
