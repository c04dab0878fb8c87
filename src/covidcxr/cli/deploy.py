"""`covidcxr predict`, `serve` and `export`: a run put to use."""

from __future__ import annotations

import argparse
import os
import sys

from covidcxr.cli.args import PORT_ARG, POSITIVE_INT_ARG, Commands


def _predict(a: argparse.Namespace) -> int:
    from covidcxr.deploy.predict import format_predictions, predict_files, use_threads
    use_threads(a.threads)
    results = predict_files(a.run, a.inputs, a.cam, a.batch_size)
    print(format_predictions(results, a.format))
    unscored = [r for r in results if r.status != "scored"]
    for r in unscored:
        what = "refused" if r.status == "refused" else "cannot score"
        print(f"covidcxr: {what} {r.path}: {r.reason}", file=sys.stderr)
    return 1 if unscored else 0


def _serve(a: argparse.Namespace) -> int:
    from covidcxr.config import ServeConfig
    from covidcxr.deploy.serve.server import serve
    serve(ServeConfig(run=a.run, host=a.host, port=a.port, db=a.db, token_file=a.token_file, no_auth=a.no_auth,
                      threads=a.threads, request_threads=a.request_threads, engine=a.engine,
                      access_log=a.access_log, keep_images=a.keep_images, monitor_window=a.monitor_window))
    return 0


def _export(a: argparse.Namespace) -> int:
    from covidcxr.deploy.export import export_run
    result = export_run(a.run, a.format, a.out)
    print(f"wrote {a.out} ({a.format}, {result['size_bytes'] / 1e6:.1f} MB); parity with covidcxr on images of "
          f"several sizes: max |diff| on probabilities = {result['max_abs_diff']:.2e}")
    print(result["contract"])
    return 0


def add_predict(sub: Commands) -> None:
    """`covidcxr predict`: score files."""
    p = sub.add_parser("predict", help="score image files or folders")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("inputs", nargs="+", help="images (PNG/JPEG/TIFF/BMP/DICOM) or folders")
    p.add_argument("--format", default="table", choices=["table", "json", "csv"], help="output format (default table)")
    p.add_argument("--cam", help="folder for Grad-CAM overlays, one PNG per image (default: none)")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE_INT_ARG, default=32,
                   help="images scored at once (default 32)")
    p.add_argument("--threads", type=POSITIVE_INT_ARG, default=os.cpu_count() or 1,
                   help=f"CPU threads for the model (default: one per core, {os.cpu_count() or 1} here)")
    p.set_defaults(func=_predict)



def add_serve(sub: Commands) -> None:
    """`covidcxr serve`: the HTTP API and page."""
    from covidcxr.config import ENGINES, REQUEST_THREADS, SERVE_THREADS
    from covidcxr.config.monitor import WINDOW
    p = sub.add_parser("serve", help="HTTP API and web page")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "any other needs an access token)")
    p.add_argument("--port", type=PORT_ARG, default=8000, help="TCP port (default 8000)")
    p.add_argument("--db", help="SQLite prediction log (default RUN/predictions.sqlite)")
    p.add_argument("--token-file", dest="token_file", help="file holding the access token clients must send as "
                   "'Authorization: Bearer TOKEN' (default: $COVIDCXR_TOKEN; none on loopback)")
    p.add_argument("--no-auth", dest="no_auth", action="store_true",
                   help="serve beyond loopback without an access token (default: refused)")
    p.add_argument("--threads", type=POSITIVE_INT_ARG, default=SERVE_THREADS,
                   help=f"CPU threads for the model's batched forward passes (default {SERVE_THREADS})")
    p.add_argument("--request-threads", dest="request_threads", type=POSITIVE_INT_ARG, default=REQUEST_THREADS,
                   help=f"threads reading and decoding uploads (default {REQUEST_THREADS})")
    p.add_argument("--access-log", dest="access_log", action="store_true",
                   help="print one line per HTTP request (default off: every prediction is in the SQLite log "
                        "already, and a line per request slows the service)")
    p.add_argument("--keep-images", dest="keep_images", metavar="DIR",
                   help="keep each scored upload as it came (named by its SHA-256) in DIR, so that covidcxr feedback "
                        "export can make a data set of those that get a reader's verdict (default: keep none; DICOM "
                        "files hold patient data)")
    p.add_argument("--monitor-window", dest="monitor_window", default=WINDOW,
                   help=f"the window /api/health and the page summarise, as covidcxr monitor --window (default "
                        f"{WINDOW})")
    p.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                   help="onnx: score with the run's exported graphs on onnxruntime (RUN/serving, exported on first "
                        "use), no torch in the server until a Grad-CAM is asked for; torch: score with torch "
                        f"(default {ENGINES[0]})")
    p.set_defaults(func=_serve)



def add_export(sub: Commands) -> None:
    """`covidcxr export`: the whole path as one graph."""
    p = sub.add_parser("export", help="deployable model (ONNX or TorchScript), parity-checked")
    p.add_argument("run", help="run folder (covidcxr train --out)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "serving"],
                   help="onnx or torchscript: one file with the whole path; serving: the folder covidcxr serve scores "
                        "with on onnxruntime (RUN/serving, made by serve itself when missing) (required)")
    p.add_argument("--out", required=True, help="file (a folder for serving) to write (required)")
    p.set_defaults(func=_export)
