"""Load test of the HTTP service on loopback: requests/s and latency percentiles for POST /api/predict.

    python benchmarks/bench_serve.py RUN [--requests 500] [--concurrency 8] [--cam] [--max-seconds 120]
    python benchmarks/bench_serve.py --random          # a random-weights gray AlexNet, no run needed

Bounded in count and time: it stops after --requests or --max-seconds, whichever comes first.
Each request uploads one 512 px PNG, the size the design's "tens of milliseconds per image on a CPU" refers to.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def write_random_run(run_dir: Path, image_size: int = 224, cache_size: int = 256, seed: int = 0) -> Path:
    """A run folder holding a random-weights gray AlexNet with the meta a Predictor needs (for tests and benches)."""
    import torch

    from covidcxr.config import AugmentConfig, to_dict
    from covidcxr.model.network import build_model, save_checkpoint
    from covidcxr.data.tasks import POSITIVE_INDEX, class_names

    torch.manual_seed(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": "covid-vs-normal",
        "classes": class_names("covid-vs-normal"),
        "positive_index": POSITIVE_INDEX,
        "image_size": image_size,
        "cache_size": cache_size,
        "augment": to_dict(AugmentConfig()),
        "threshold": 0.5,
        "threshold_method": "fixed (random weights)",
    }
    save_checkpoint(run_dir / "model.pt", build_model("alexnet", 2, weights="none"), meta)
    return run_dir


def chest_like_png(side: int = 512, seed: int = 0) -> bytes:
    """A smooth gray image with noise: compresses like a radiograph, not like a flat test card."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    img = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 0.05, (side, side))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def load(url: str, data: bytes, requests: int, concurrency: int, cam: bool, max_seconds: float) -> dict:
    """Send up to `requests` uploads from `concurrency` threads; stop early at the time limit."""
    deadline = time.monotonic() + max_seconds
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        start = time.perf_counter()
        try:
            res = client.post(f"{url}/api/predict", params={"cam": cam}, files={"file": (f"img{i}.png", data)})
            ok, why = res.status_code == 200, f"HTTP {res.status_code}: {res.text[:200]}"
        except httpx.HTTPError as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        with lock:
            (latencies.append(time.perf_counter() - start) if ok else errors.append(why))

    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        client.get(f"{url}/api/health").raise_for_status()  # warm-up: connection and first-call costs
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - t0
    lat_ms = np.array(latencies) * 1000
    return {
        "ok": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat_ms) else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat_ms) else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run folder (omit with --random)")
    parser.add_argument("--random", action="store_true", help="serve a random-weights gray AlexNet")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cam", action="store_true", help="ask for a Grad-CAM overlay with every prediction")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if bool(args.run) == args.random:
        parser.error("give a RUN folder or --random, not both")

    from covidcxr.deploy.predict import Predictor
    from covidcxr.deploy.serve.app import background_server, create_app

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else write_random_run(Path(tmp) / "random-run")
        predictor = Predictor.from_run(run, device=args.device)
        app = create_app(predictor, Path(tmp) / "bench.sqlite")
        with background_server(app) as url:
            r = load(url, chest_like_png(), args.requests, args.concurrency, args.cam, args.max_seconds)
    print(
        f"model {predictor.model_id} on {args.device}, cam={args.cam}: {r['ok']} ok, {r['errors']} errors "
        f"in {r['seconds']:.1f} s, {r['requests_per_s']:.1f} requests/s, "
        f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms ({args.concurrency} concurrent)"
    )
    if r["first_error"]:
        print(f"first error: {r['first_error']}", file=sys.stderr)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
