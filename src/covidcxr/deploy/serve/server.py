"""`covidcxr serve`: check who may connect, bind the port, load the run once on its engine, serve."""

from __future__ import annotations

import logging
import errno
import socket
from pathlib import Path

from covidcxr.deploy.serve.access import access_token
from covidcxr.deploy.serve.app import DEFAULT_MAX_UPLOAD_BYTES, create_app
from covidcxr.deploy.serve.defaults import ENGINES, REQUEST_THREADS, SERVE_THREADS
from covidcxr.errors import InputError, PortInUseError

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port is a one-line error, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"{host}:{port} is already in use by another program; choose another --port") from None
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    return sock


def load_predictor(run_dir: str | Path, engine: str, threads: int):
    """The run's predictor on onnxruntime (`deploy/engine.py`: torch stays out of the process) or on torch."""
    if engine == "onnx":
        from covidcxr.deploy.engine import EnginePredictor
        return EnginePredictor.from_run(run_dir, threads)
    if engine != "torch":
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    from covidcxr.deploy.predict import Predictor, use_threads
    use_threads(threads)
    return Predictor.from_run(run_dir, device="cpu")


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    db_path: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    token_file: str | Path | None = None,
    no_auth: bool = False,
    threads: int = SERVE_THREADS,
    request_threads: int = REQUEST_THREADS,
    reject_ood: bool = False,
    engine: str = ENGINES[0],
    access_log: bool = False,
) -> None:
    """Serve the run until interrupted; the log defaults to RUN/predictions.sqlite. uvicorn's per-request access
    log is off unless `access_log` (errors and start-up lines are always printed)."""
    import uvicorn

    token = access_token(host, token_file, no_auth)
    sock = bind(host, port)
    predictor = load_predictor(run_dir, engine, threads)
    db = Path(db_path) if db_path is not None else Path(run_dir) / "predictions.sqlite"
    app = create_app(predictor, db, max_upload_bytes, token=token, request_threads=request_threads,
                     reject_ood=reject_ood)
    log.info("serving %s on http://%s:%d (%s); Ctrl-C stops", predictor.model_id, host, sock.getsockname()[1],
             "token required" if token else "no access token")
    uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=access_log)).run(sockets=[sock])
