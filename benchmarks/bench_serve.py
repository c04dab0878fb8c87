"""Load test of `covidcxr serve` on loopback: requests/s, latency percentiles and the server's memory.

    python benchmarks/bench_serve.py [RUN] [--requests 1000] [--concurrency 8] [--engines onnx torch]
                                     [--threads 1 2] [--cam]

Without RUN, a random-weights gray AlexNet run at the default training settings is written to a temporary folder
(the figures depend on the input side and cache size, not on the weights). Each setting of --engines x --threads
starts the real server (`python -m covidcxr.cli serve`) in its own process (the onnx engine is exported on the
first start, before any timing), sends --requests uploads of one 512 px PNG from --concurrency keep-alive clients
(bounded in count and in --max-seconds), --repeat times (the median run is reported: on a shared VM single runs
vary by +-15 %), reads the server's peak RSS from
/proc, stops it, and prints one line per setting with the design's targets: >= 150 requests/s with p99 < 100 ms at
8 concurrent clients and no errors, server RSS <= 700 MB. The report also goes to docs/results/bench_serve.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TARGET_RPS, TARGET_P99_MS, TARGET_RSS_MB = 150.0, 100.0, 700.0
SHARED_NOTE = ("The load average in the first line was read before the run: above about 1, other jobs shared the CPU "
               "and the figures are pessimistic.")


def write_random_run(run_dir: Path, image_size: int | None = None, cache_size: int | None = None,
                     seed: int = 0, gate: bool = True) -> Path:
    """A run folder holding a random-weights gray AlexNet with the meta a Predictor needs (tests and benchmarks);
    input side and cache size default to `covidcxr train`'s on a CPU and `covidcxr ingest`'s.

    With `gate`, also a gate (the real network and rules, briefly fitted) that accepts `chest_like_png` images and
    refuses blank and noise ones: every request then pays the gate's cost, as it does in a trained run."""
    import torch

    from covidcxr.config import AugmentConfig, IngestConfig, to_dict
    from covidcxr.data.tasks import POSITIVE_INDEX, class_names
    from covidcxr.model.checkpoint import save_checkpoint
    from covidcxr.model.network import build_model
    from covidcxr.training.trainer import AUTO_IMAGE_SIZE

    torch.manual_seed(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": "covid-vs-normal",
        "classes": class_names("covid-vs-normal"),
        "positive_index": POSITIVE_INDEX,
        "image_size": image_size or AUTO_IMAGE_SIZE["cpu"],
        "cache_size": cache_size or IngestConfig().size,
        "augment": to_dict(AugmentConfig()),
        "threshold": 0.5,
        "threshold_method": "fixed (random weights)",
    }
    save_checkpoint(run_dir / "model.pt", build_model("alexnet", 2, weights="none"), meta)
    if gate:
        write_quick_gate(run_dir, seed)
    return run_dir


def write_quick_gate(run_dir: Path, seed: int = 0) -> None:
    """RUN/gate.onnx + gate.json fitted in a few seconds: chest-like images against blank and noise ones."""
    from covidcxr.config import GateSettings
    from covidcxr.training.gate import build_gate
    from covidcxr.trust.negatives import blank_or_noise, thumbnail

    films = np.stack([thumbnail(np.asarray(Image.open(io.BytesIO(chest_like_png(seed=s))))) for s in range(24)])
    rng = np.random.default_rng(seed)
    noise = np.stack([blank_or_noise(rng) for _ in range(48)])
    build_gate(run_dir, {"frontal": films, "blank_or_noise": noise}, films[:8], GateSettings(steps=40), seed)


def chest_like_png(side: int = 512, seed: int = 0) -> bytes:
    """A smooth gray image with noise: compresses like a radiograph, not like a flat test card."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    img = 0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 0.05, (side, side))
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, db: Path, port: int, threads: int, engine: str,
                 timeout_s: float = 300.0) -> subprocess.Popen:
    """`covidcxr serve` on loopback in its own process, returned once /api/health answers."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("COVIDCXR_TOKEN", None)
    cmd = [sys.executable, "-m", "covidcxr.cli", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
           "--db", str(db), "--threads", str(threads), "--engine", engine]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer on port {port} within {timeout_s:.0f} s")


def memory_mb(pid: int) -> dict[str, float]:
    """The process's peak resident set (VmHWM), its resident set now (VmRSS) and the anonymous part of it (RssAnon:
    what is not shared library code), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) / 1024 for key, name in
            (("peak", "VmHWM"), ("now", "VmRSS"), ("anon", "RssAnon"))}


def upload_request(port: int, data: bytes, cam: bool) -> bytes:
    """One whole HTTP/1.1 keep-alive POST of /api/predict with `data` as the multipart file, built once."""
    boundary = "covidcxr-bench-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/predict?cam={str(cam).lower()} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one request on an open connection; (status, body) of its response (Content-Length framed)."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def load(port: int, data: bytes, requests: int, concurrency: int, cam: bool, max_seconds: float) -> dict:
    """Up to `requests` uploads from `concurrency` clients, each on its own keep-alive connection, sending its next
    upload when answered. The clients are plain asyncio streams with the request built once: the load generator
    shares the CPU with the server, and a full HTTP client library would take a large part of it."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds
    counter = iter(range(requests))
    request = upload_request(port, data, cam)

    async def client_loop(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        for _ in counter:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                status, body = await exchange(*connection, request)
                ok, why = status == 200, f"HTTP {status}: {body[:200]!r}"
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            (latencies.append(time.perf_counter() - start) if ok else errors.append(why))

    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    for connection in connections:  # warm-up: first-call allocations, kernel choice
        status, body = await exchange(*connection, request)
        if status != 200:
            raise RuntimeError(f"warm-up request failed: HTTP {status}: {body[:200]!r}")
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in connections))
    elapsed = time.perf_counter() - t0
    for _, writer in connections:
        writer.close()
    lat_ms = np.array(latencies) * 1000
    return {"ok": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": elapsed, "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
            "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat_ms) else float("nan"),
            "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat_ms) else float("nan")}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    load1, load5, _ = os.getloadavg()
    versions = ", ".join(f"{name} {version(name)}" for name in ("torch", "onnxruntime", "fastapi", "uvicorn"))
    return (f"machine: {platform.node()}, {cpu}, {os.cpu_count()} cores, load average {load1:.1f} (1 min) "
            f"{load5:.1f} (5 min)\nversions: Python {platform.python_version()}, {versions}")


def verdict(r: dict, rss_mb: float, concurrency: int) -> str:
    met = {f">= {TARGET_RPS:.0f} req/s": r["requests_per_s"] >= TARGET_RPS,
           f"p99 < {TARGET_P99_MS:.0f} ms": r["p99_ms"] < TARGET_P99_MS,
           "0 errors": r["errors"] == 0, f"RSS <= {TARGET_RSS_MB:.0f} MB": rss_mb <= TARGET_RSS_MB}
    scope = "" if concurrency == 8 else " (targets are set for 8 clients)"
    return "targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in met.items()) + scope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="run folder (default: a random-weights run at the default settings)")
    parser.add_argument("--requests", type=int, default=1000, help="uploads per setting (default 1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="server --threads settings to measure (default 1 2)")
    parser.add_argument("--engines", nargs="+", default=["onnx", "torch"], choices=["onnx", "torch"],
                        help="server --engine settings to measure (default onnx torch)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="load runs per setting on the same server; the median run is reported (default 3)")
    parser.add_argument("--cam", action="store_true", help="ask for a Grad-CAM overlay with every prediction")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time limit per setting (default 120)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_serve.txt",
                        help="report file (default %(default)s)")
    args = parser.parse_args(argv)

    lines = [machine()]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else write_random_run(Path(tmp) / "random-run")
        from covidcxr.model.checkpoint import load_checkpoint
        meta = load_checkpoint(run / "model.pt")["meta"]
        lines.append(f"run: {'random-weights ' if not args.run else ''}{meta['arch']}, input {meta['image_size']} px, "
                     f"cache {meta['cache_size']} px; upload: one 512 px PNG; {args.concurrency} concurrent clients, "
                     f"{args.requests} requests per setting, cam={args.cam}")
        print("\n".join(lines), flush=True)
        failed = False
        for engine, threads in [(e, t) for e in args.engines for t in args.threads]:
            port = free_port()
            proc = start_server(run, Path(tmp) / f"log-{engine}-{threads}.sqlite", port, threads, engine)
            try:
                runs = [asyncio.run(load(port, chest_like_png(), args.requests, args.concurrency, args.cam,
                                         args.max_seconds)) for _ in range(args.repeat)]
                mem = memory_mb(proc.pid)
            finally:
                proc.terminate()
                proc.wait(30)
            r = sorted(runs, key=lambda run: run["requests_per_s"])[len(runs) // 2]  # the median run
            spread = ", ".join(f"{run['requests_per_s']:.0f}" for run in runs)
            line = (f"serve --engine {engine} --threads {threads} (median of {len(runs)} runs: {spread} "
                    f"requests/s): {r['ok']} ok, {r['errors']} errors in "
                    f"{r['seconds']:.1f} s: "
                    f"{r['requests_per_s']:.1f} requests/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                    f"server RSS {mem['now']:.0f} MB after the load ({mem['anon']:.0f} MB of it not shared library "
                    f"code), peak {mem['peak']:.0f} MB\n  {verdict(r, mem['peak'], args.concurrency)}")
            print(line, flush=True)
            lines.append(line)
            if r["first_error"]:
                print(f"first error: {r['first_error']}", file=sys.stderr)
            failed |= any(run["errors"] for run in runs)
    write_report(lines, args.out)
    return 1 if failed else 0


def write_report(lines: list[str], out: Path) -> None:
    """The report's lines and the note on a shared machine, to `out` (and the note and where it went, to stdout)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*lines, SHARED_NOTE]) + "\n")
    print(f"{SHARED_NOTE}\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(main())
