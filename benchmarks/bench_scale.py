"""Training as the data grow: images/s and peak memory at 10k, 50k and 200k images, streamed vs held in memory.

    python benchmarks/bench_scale.py [--sizes 10000 50000 200000] [--side 32] [--image-size 64] [--steps 20]
                                     [--batch-size 32] [--device cpu] [--work DIR] [--out docs/results/bench_scale]

Writes a synthetic data folder per size straight to disk (a cache file of random gray squares and a manifest with
every column ingest writes, thumbnails included; nothing is decoded), then, in a fresh process per size and path,
builds the trainer (default preprocessing, global equalization included) and trains a fixed number of steps. Peak RSS
is that process's own high-water mark (set-up included: the in-memory path reads and normalises every image there).
Throughput is measured in the in-memory path's process, in rounds that alternate its held images with a streamed feed
of the same images and the same batches (each going first in every other round), so that a busy shared machine slows
both alike. Writes OUT.md (the table, and
what 400k images need) and OUT.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covidcxr.config import TrainConfig
from covidcxr.data.cache import CACHE_FILE, MANIFEST_FILE, ImageCache
from covidcxr.data.manifest import MANIFEST_COLUMNS
from covidcxr.formatting import markdown_table, number, percent
from covidcxr.training.feed import Images
from covidcxr.training.trainer import Trainer

PATHS = ("stream", "memory")
WARMUP = 3  # steps before the clock starts (allocations, first-touch)
ROUNDS = 4  # alternations of the two feeds; each runs steps / ROUNDS steps per round
TARGET_SIDE = 256  # the cache side ingest writes by default, for what 400k images need
CHUNK = 8192


def write_data(folder: Path, n: int, side: int) -> None:
    """A data folder of n random squares and their manifest, written without decoding anything."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    with open(folder / CACHE_FILE, "wb") as fh:
        for start in range(0, n, CHUNK):
            rng.integers(0, 256, (min(CHUNK, n - start), side, side), np.uint8).tofile(fh)
    i = np.arange(n)
    df = pd.DataFrame({
        "path": [f"/data/sources/synthetic-{i % 4}/images/{k:07d}.png" for k in i],
        "label": np.where(i % 2 == 0, "covid", "normal"),
        "source": [f"synthetic-{k % 4}" for k in i],
        "patient_id": [f"synthetic-{k % 4}:{k // 2}" for k in i],
        "view": "PA", "finding": "", "age_group": "adult", "sex": "",
        "sha1": [hashlib.sha1(str(k).encode()).hexdigest() for k in i],
        "phash": "0123456789abcdef", "thumb": [bytes(1024)] * n, "orig_height": 2048, "orig_width": 2048,
        "mtime": 0.0, "size_bytes": 1_000_000, "cache_index": i, "duplicate_of": "",
    })[MANIFEST_COLUMNS]
    df.to_parquet(folder / MANIFEST_FILE, index=False)
    cache = ImageCache(folder, size=side)
    cache.capacity = n
    cache.write_meta()


def interleaved(trainer: Trainer, steps: int) -> dict[str, float]:
    """images/s of the held images and of a streamed feed of the same rows, alternating in rounds on the same
    batches (each round is one epoch's first steps / ROUNDS steps, run once per feed)."""
    feeds = {"memory": trainer.train_images,
             "stream": Images(trainer.cache, trainer.train_df["cache_index"].to_numpy(), trainer.preprocess,
                              trainer.device, hold=False)}
    seconds = dict.fromkeys(feeds, 0.0)
    per_round = max(1, steps // ROUNDS)
    for epoch in range(1 + ROUNDS):  # epoch 0: warm-up of both
        for name in sorted(feeds, reverse=epoch % 2 == 1):
            trainer.train_images = feeds[name]
            sync(trainer.device)
            start = time.perf_counter()
            trainer.train_epoch(epoch, stop=per_round if epoch else WARMUP)
            sync(trainer.device)
            seconds[name] += (time.perf_counter() - start) if epoch else 0.0
    return {name: ROUNDS * per_round * trainer.cfg.batch_size / s for name, s in seconds.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(data: Path, path: str, image_size: int, batch: int, steps: int, device: str) -> dict:
    """In this process: build the trainer on `data` and train `steps` steps after a warm-up; set-up seconds, peak RSS,
    and (in-memory path) the interleaved images/s of both feeds, or (streaming path) its own."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=str(data), out=str(Path(out) / "run"), weights="none", image_size=image_size,
                          epochs=1 + ROUNDS, batch_size=batch, device=device, seed=0, amp=device != "cpu",
                          data_path=path)
        start = time.perf_counter()
        trainer = Trainer(cfg)
        setup = time.perf_counter() - start
        if trainer.in_memory:
            speeds = interleaved(trainer, steps)
        else:
            trainer.train_epoch(0, stop=WARMUP)
            sync(trainer.device)
            start = time.perf_counter()
            trainer.train_epoch(1, stop=steps)
            sync(trainer.device)
            speeds = {"stream_alone": steps * batch / (time.perf_counter() - start)}
    return {"path": path, "setup_s": setup, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "images_per_s": speeds}


def run_child(data: Path, path: str, args: argparse.Namespace) -> dict:
    """`measure` in a fresh process, so that each peak is its own."""
    cmd = [sys.executable, __file__, "--child", str(data), path, "--image-size", str(args.image_size), "--batch-size",
           str(args.batch_size), "--steps", str(args.steps), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[dict], args: argparse.Namespace) -> str:
    """The table, the two targets and what 400k images need."""
    by = {(r["images"], r["path"]): r for r in results}
    sizes = sorted({r["images"] for r in results})
    speed = {(n, path): by[n, "memory"]["images_per_s"][path] for n in sizes for path in PATHS}
    rows = [[f"{n:,}", path, number(by[n, path]["setup_s"], 1), f"{by[n, path]['peak_rss_mb']:,.0f}",
             number(speed[n, path], 1), percent(speed[n, "stream"] / speed[n, "memory"]) if path == "stream" else "",
             number(by[n, "stream"]["images_per_s"]["stream_alone"], 1) if path == "stream" else ""]
            for n in sizes for path in PATHS]
    stream_rss = [by[n, "stream"]["peak_rss_mb"] for n in sizes]
    ratios = [speed[n, "stream"] / speed[n, "memory"] for n in sizes]
    memory_rss = [by[n, "memory"]["peak_rss_mb"] for n in sizes]
    span = sizes[-1] - sizes[0]
    row_kb = (stream_rss[-1] - stream_rss[0]) * 1024 / span  # what every image costs either way (its manifest row)
    image_kb = (memory_rss[-1] - memory_rss[0]) * 1024 / span - row_kb  # the in-memory path's cost of its pixels
    scale = (TARGET_SIDE / args.side) ** 2
    need_gb = (image_kb * scale + row_kb) * 400_000 / 1024 ** 2
    lines = [
        f"device: {args.device_name}; cache side {args.side} px, model input {args.image_size} px "
        f"(default preprocessing: global equalization); batch {args.batch_size}; "
        f"{args.steps} timed steps per path; AlexNet, random init; one process per row (its set-up and peak RSS); "
        f"images/s of both paths from the in-memory row's process, alternating the two feeds in {ROUNDS} rounds",
        "",
        markdown_table(["images", "path", "set-up s", "peak RSS MB", "images/s (interleaved)",
                        "streaming / in-memory", "images/s (streaming process alone)"], rows),
        "",
        f"streaming peak RSS from {sizes[0]:,} to {sizes[-1]:,} images: {min(stream_rss):,.0f} to "
        f"{max(stream_rss):,.0f} MB, spread {percent(max(stream_rss) / min(stream_rss) - 1, 1)} (target <= 10 %)",
        f"streaming throughput / in-memory: {percent(min(ratios))} at worst (target >= 90 %)",
        f"peak RSS per image: {row_kb:.2f} KB on both paths (the image's row of the manifest), plus {image_kb:.1f} KB "
        f"on the in-memory path ({image_kb / (args.side ** 2 / 1024):.1f} x its {args.side} px cache bytes)",
        "",
        f"400,000 images at {TARGET_SIDE} px (ingest's default side): a cache file of "
        f"{400_000 * TARGET_SIDE ** 2 / 1e9:.1f} GB on disk; held in memory, ~{need_gb:.0f} GB of RAM more than the "
        f"smallest run, per rank, by the slopes above; streamed, ~{row_kb * 400_000 / 1024:.0f} MB more (the manifest "
        "rows; the images stay on disk and in the page cache, which every rank of a node shares).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--side", type=int, default=32, help="cache side in px (default 32)")
    ap.add_argument("--image-size", dest="image_size", type=int, default=64, help="model input in px (default 64)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default cpu; bf16 autocast on cuda)")
    ap.add_argument("--work", help="folder for the synthetic data folders (default: a temporary one)")
    ap.add_argument("--out", default="docs/results/bench_scale", help="results path without suffix")
    ap.add_argument("--child", nargs=2, metavar=("DATA", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.image_size, args.batch_size, args.steps,
                                 args.device)))
        return
    args.device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"cpu ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        results = []
        for n in args.sizes:
            data = Path(work) / f"data{n}"
            start = time.perf_counter()
            write_data(data, n, args.side)
            print(f"{n:,} images written in {time.perf_counter() - start:.1f} s", flush=True)
            for path in PATHS:
                results.append({"images": n, **run_child(data, path, args)})
                print(json.dumps(results[-1]), flush=True)
            for f in data.iterdir():
                f.unlink()
    text = report(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    Path(f"{args.out}.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                                 if k != "child"}, "results": results}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
