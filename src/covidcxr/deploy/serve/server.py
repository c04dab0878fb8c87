"""`covidcxr serve`: check who may connect, bind the port, load the run once on its engine, serve."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from covidcxr.config import ENGINES, ServeConfig, save_json, to_dict
from covidcxr.deploy.serve.access import access_token
from covidcxr.deploy.serve.app import create_app
from covidcxr.errors import InputError, PortInUseError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch's Predictor or the engine's EnginePredictor: the same interface
    from covidcxr.deploy.engine import EnginePredictor
    from covidcxr.deploy.predict import Predictor

SETTINGS_SUFFIX = ".serve.json"  # the settings beside the log: RUN/predictions.sqlite -> RUN/predictions.serve.json


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


def load_predictor(run_dir: str | Path, engine: str, threads: int) -> Predictor | EnginePredictor:
    """The run's predictor on onnxruntime (`deploy/engine.py`: torch stays out of the process) or on torch."""
    if engine == "onnx":
        from covidcxr.deploy.engine import EnginePredictor
        return EnginePredictor.from_run(run_dir, threads)
    if engine != "torch":
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    from covidcxr.deploy.predict import Predictor, use_threads
    use_threads(threads)
    return Predictor.from_run(run_dir, device="cpu")


def serve(cfg: ServeConfig) -> None:
    """Serve `cfg.run` until interrupted; its settings are saved beside the prediction log (RUN/predictions.sqlite
    unless `cfg.db`), so the log says which settings answered. uvicorn's per-request access log is off unless
    `cfg.access_log` (errors and start-up lines are always printed)."""
    import uvicorn

    token = access_token(cfg.host, cfg.token_file, cfg.no_auth)
    sock = bind(cfg.host, cfg.port)
    predictor = load_predictor(cfg.run, cfg.engine, cfg.threads)
    app = create_app(predictor, cfg, token=token)
    db = cfg.log_path(cfg.run)
    save_json(to_dict(cfg), db.with_name(db.stem + SETTINGS_SUFFIX))
    log.info("serving %s on http://%s:%d (%s); Ctrl-C stops", predictor.model_id, cfg.host, sock.getsockname()[1],
             "token required" if token else "no access token")
    uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=cfg.access_log)).run(sockets=[sock])
