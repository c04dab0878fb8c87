"""HTTP service: upload a chest X-ray, get the model's probability, its label and a Grad-CAM overlay.

The predictor is built once by the caller and shared by all requests. Inference runs under one lock:
PyTorch already spreads one forward pass over all CPU cores, and Grad-CAM keeps per-call state in hooks on the
model, so parallel calls into one predictor would gain little and could mix up their maps.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from covidcxr import __version__
from covidcxr.data.reader import ImageReadError
from covidcxr.deploy.serve.log import LogRecord, PredictionLog, utc_now
from covidcxr.errors import InputError, PortInUseError

DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a large uncompressed DICOM radiograph is ~20-30 MB
MULTIPART_SLACK_BYTES = 64 * 1024  # form framing around the file; the file itself is checked exactly
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
ACCEPTED = "PNG, JPEG, TIFF, BMP or DICOM"


class PredictorLike(Protocol):
    """What the service needs from a model; `covidcxr.deploy.predict.Predictor` satisfies it."""

    model_id: str
    threshold: float
    positive_label: str

    def predict_bytes(self, data: bytes, filename: str, cam: bool) -> dict:
        """-> {"probability", "label", "threshold", "heatmap_png": bytes | None}; raises ImageReadError."""
        ...


class Prediction(BaseModel):
    probability: float = Field(description="probability of the positive class, in [0, 1]")
    label: str = Field(description="label at the threshold")
    threshold: float
    model_id: str
    heatmap: str | None = Field(description="Grad-CAM overlay as a PNG data URL, when cam=true")
    sha256: str = Field(description="SHA-256 of the uploaded bytes, as logged")


class Health(BaseModel):
    status: str
    model_id: str
    positive_label: str
    threshold: float
    max_upload_bytes: int


class Problem(BaseModel):
    detail: str


def _require_image_content(data: bytes, filename: str) -> None:
    """Judge the content, never the file name: 415 unless it is one of PILLOW_FORMATS or DICOM, 422 if absurdly large.

    Only those decoders are tried, so Pillow's rarer plugins (and EPS's Ghostscript) never see uploaded bytes.
    """
    if data[128:132] == b"DICM":
        return
    try:
        Image.open(io.BytesIO(data), formats=PILLOW_FORMATS).close()  # reads the header only
    except UnidentifiedImageError:
        raise HTTPException(415, f"{filename}: not a supported image (expected {ACCEPTED} content)") from None
    except Image.DecompressionBombError as exc:
        raise HTTPException(422, f"{filename}: image too large ({exc})") from None


def _read_upload(file: UploadFile, filename: str, limit: int) -> bytes:
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{filename}: file too large (limit {limit:,} bytes)")
    if not data:
        raise HTTPException(422, f"{filename}: empty file (0 bytes)")
    return data


def _data_url(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def create_app(
    predictor: PredictorLike, db_path: str | Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> FastAPI:
    """Build the service around one already-loaded predictor; every successful prediction is logged to db_path."""
    log = PredictionLog(db_path)
    lock = threading.Lock()
    page = (files("covidcxr.deploy.serve") / "static" / "index.html").read_text(encoding="utf-8")
    errors = {
        413: {"model": Problem, "description": "file too large (text/plain when the whole body is over the limit)"},
        415: {"model": Problem, "description": f"not an image, or not {ACCEPTED}"},
    }
    app = FastAPI(
        title="covidcxr",
        summary="COVID-19 chest X-ray screening aid (not a diagnosis)",
        version=__version__,
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> Health:
        return Health(
            status="ok",
            model_id=predictor.model_id,
            positive_label=predictor.positive_label,
            threshold=predictor.threshold,
            max_upload_bytes=max_upload_bytes,
        )

    @app.post("/api/predict", responses=errors, max_body_size=max_upload_bytes + MULTIPART_SLACK_BYTES)
    def predict(
        file: UploadFile = File(description=f"chest X-ray: {ACCEPTED}"),
        cam: bool = Query(False, description="also return a Grad-CAM overlay"),
    ) -> Prediction:
        """Score one uploaded image. Errors: 413 too large; 415 not an image; 422 an image that cannot be used
        (no pixel data, corrupt, absurd size: `detail` is one line) or a malformed form (`detail` is a list)."""
        filename = file.filename or "upload"
        data = _read_upload(file, filename, max_upload_bytes)
        _require_image_content(data, filename)
        try:
            with lock:
                result = predictor.predict_bytes(data, filename, cam)
        except ImageReadError as exc:
            raise HTTPException(422, str(exc)) from None
        digest = hashlib.sha256(data).hexdigest()
        out = Prediction(
            probability=float(result["probability"]),
            label=result["label"],
            threshold=float(result["threshold"]),
            model_id=predictor.model_id,
            heatmap=_data_url(result["heatmap_png"]),
            sha256=digest,
        )
        log.add(LogRecord(utc_now(), digest, filename, out.probability, out.label, out.threshold, out.model_id))
        return out

    return app


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", timeout_s: float = 20.0) -> Iterator[str]:
    """Run uvicorn on a free loopback port in a daemon thread; yield its base URL; stop it on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket to serve on, bound before the model loads, so a busy port is one clear error (uvicorn would log
    and exit 3)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may reuse the port
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"{host}:{port} is already in use by another program; choose another --port") from None
        raise InputError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); check --host and --port") from None
    return sock


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    db_path: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> None:
    """Load the run's model once and serve it until interrupted; the log defaults to RUN/predictions.sqlite."""
    import uvicorn

    from covidcxr.deploy.predict import Predictor

    with listening_socket(host, port) as sock:
        predictor = Predictor.from_run(run_dir)
        db = Path(db_path) if db_path is not None else Path(run_dir) / "predictions.sqlite"
        config = uvicorn.Config(create_app(predictor, db, max_upload_bytes), host=host, port=port)
        uvicorn.Server(config).run(sockets=[sock])
