"""What recording readers' verdicts costs the service: `covidcxr serve` on loopback under the load of
benchmarks/bench_serve.py (8 keep-alive clients uploading one 512 px PNG), first predictions alone, then each
prediction followed by a verdict on it (POST /api/feedback) from the same client. Prints the p50 of /api/predict in
both phases and of /api/feedback itself (target: recording a verdict adds at most 5 ms to the service's p50), and
writes docs/results/bench_feedback.txt.

    python benchmarks/bench_feedback.py [--requests 400] [--concurrency 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_serve import (
    RESULTS,
    chest_like_png,
    exchange,
    free_port,
    machine,
    start_server,
    upload_request,
    write_random_run,
    write_report,
)

TARGET_MS = 5.0


def feedback_request(port: int, prediction_id: int) -> bytes:
    body = json.dumps({"prediction_id": prediction_id, "label": "normal", "reader": "bench"}).encode()
    head = (f"POST /api/feedback HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def load(port: int, requests: int, concurrency: int, verdicts: bool) -> dict:
    """`requests` predictions from `concurrency` clients; with `verdicts`, each followed by a verdict on it."""
    upload = upload_request(port, chest_like_png(), cam=False)
    predict_ms: list[float] = []
    feedback_ms: list[float] = []
    counter = iter(range(requests))

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in counter:
            t0 = time.perf_counter()
            status, body = await exchange(reader, writer, upload)
            predict_ms.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"predict: HTTP {status}: {body[:200]!r}")
            if verdicts:
                verdict = feedback_request(port, json.loads(body)["prediction_id"])
                t0 = time.perf_counter()
                status, answer = await exchange(reader, writer, verdict)
                feedback_ms.append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    raise RuntimeError(f"feedback: HTTP {status}: {answer[:200]!r}")

    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    for connection in connections:  # warm-up
        await exchange(*connection, upload)
    await asyncio.gather(*(client(*c) for c in connections))
    for _, writer in connections:
        writer.close()
    return {"predict_p50": float(np.median(predict_ms)),
            "feedback_p50": float(np.median(feedback_ms)) if feedback_ms else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="predictions per phase and run (default 400)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of both phases; medians reported (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_feedback.txt", help="report file")
    args = parser.parse_args(argv)
    lines = [machine()]
    with tempfile.TemporaryDirectory() as tmp:
        run = write_random_run(Path(tmp) / "random-run")
        port = free_port()
        proc = start_server(run, Path(tmp) / "log.sqlite", port, threads=1, engine="onnx")
        try:
            runs = [(asyncio.run(load(port, args.requests, args.concurrency, False)),
                     asyncio.run(load(port, args.requests, args.concurrency, True))) for _ in range(args.repeat)]
        finally:
            proc.terminate()
            proc.wait(30)
    alone = float(np.median([a["predict_p50"] for a, _ in runs]))
    mixed = float(np.median([b["predict_p50"] for _, b in runs]))
    feedback = float(np.median([b["feedback_p50"] for _, b in runs]))
    added = mixed - alone
    lines.append(f"serve --engine onnx --threads 1, random-weights run, {args.concurrency} keep-alive clients, "
                 f"{args.requests} predictions per phase, median of {args.repeat} runs:")
    lines.append(f"  predictions alone: p50 {alone:.1f} ms; each followed by a verdict: predict p50 {mixed:.1f} ms "
                 f"({added:+.1f} ms), POST /api/feedback p50 {feedback:.1f} ms")
    lines.append(f"  target: recording a verdict adds at most {TARGET_MS:.0f} ms to the service's p50: "
                 f"{'met' if max(added, feedback) <= TARGET_MS else 'NOT met'} (the larger of the two: "
                 f"{max(added, feedback):.1f} ms)")
    print("\n".join(lines))
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
