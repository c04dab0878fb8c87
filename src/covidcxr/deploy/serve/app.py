"""HTTP service: upload a chest X-ray, get the model's probability, its label and a Grad-CAM overlay.

The predictor is loaded once and shared by all requests. Reading, checking and decoding an upload run on a small
pool of request threads, off the event loop; the images of concurrent requests are then scored together in one
forward pass (`Batcher`), on the one thread that owns the model, which also runs Grad-CAM requests between batches.
Off loopback the API needs a bearer token (`access.py`); the OpenAPI docs are served from local files, so `/docs`
works without the internet.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from covidcxr import __version__
from covidcxr.config import ServeConfig
from covidcxr.data.reader import ImageReadError
from covidcxr.deploy.serve.access import bearer_guard
from covidcxr.deploy.serve.batcher import Batcher
from covidcxr.deploy.serve.log import LogRecord, PredictionLog, utc_now
from covidcxr.errors import InputError
from covidcxr.trust.shift import ShiftMonitor, reference_scores

if TYPE_CHECKING:  # torch's Predictor or the engine's EnginePredictor: the same interface
    from covidcxr.deploy.engine import EnginePredictor
    from covidcxr.deploy.predict import Predictor

MULTIPART_SLACK_BYTES = 64 * 1024  # form framing around the file; the file itself is checked exactly
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
ACCEPTED = "PNG, JPEG, TIFF, BMP or DICOM"
WITHHELD = "withheld: out of distribution"  # the label logged for an answer whose label --reject-ood withheld


class Prediction(BaseModel):
    probability: float = Field(description="probability of the positive class, in [0, 1]")
    label: str | None = Field(description="label at the threshold; null when withheld (--reject-ood and the image "
                                          "is out of distribution)")
    in_distribution: bool | None = Field(description="the run's guard accepts the image as like its training data; "
                                                     "null when the run has no guard")
    ood_score: float | None = Field(description="typicality: higher is less typical; above the guard's threshold is "
                                                "out of distribution")
    threshold: float
    triage: str | None = Field(default=None, description="rule-out, rule-in or needs a reader, when the run has "
                                                          "triage thresholds (covidcxr calibrate --triage); else null")
    model_id: str
    heatmap: str | None = Field(description="Grad-CAM overlay as a PNG data URL, when cam=true")
    sha256: str = Field(description="SHA-256 of the uploaded bytes, as logged")


class Health(BaseModel):
    status: str
    engine: str = Field(description="what scores: onnxruntime (the run's exported graphs) or torch")
    model_id: str
    training: str = Field(description="how the weights came about: transfer learning from ImageNet, or trained from "
                                      "scratch")
    positive_label: str
    threshold: float
    triage: dict | None = Field(default=None, description="the run's triage thresholds and their guarantee; null "
                                                          "without")
    max_upload_bytes: int
    shift: dict | None = Field(description="the shift alarm over the latest predictions against the run's validation "
                                           "scores (alarm, rates, p-values, message); null without validation scores")


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
    """The upload's bytes, reading at most one byte past the limit: a huge file is refused, not buffered."""
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{filename}: file too large (limit {limit:,} bytes)")
    if not data:
        raise HTTPException(422, f"{filename}: empty file (0 bytes)")
    return data


def _decode_upload(predictor: Predictor | EnginePredictor, file: UploadFile, filename: str,
                   limit: int) -> tuple[str, np.ndarray]:
    """(SHA-256, cache square) of an upload: everything before the model, run on a request thread."""
    data = _read_upload(file, filename, limit)
    _require_image_content(data, filename)
    try:
        square = predictor.read_bytes(data, filename)
    except ImageReadError as exc:
        raise HTTPException(422, str(exc)) from None
    return hashlib.sha256(data).hexdigest(), square


def shift_monitor(predictor: Predictor | EnginePredictor, window: int) -> ShiftMonitor | None:
    """The rolling shift alarm against the run's validation scores; None for a run without them (e.g. a random one)."""
    try:
        reference = reference_scores(predictor.spec.run_dir)
    except InputError:
        return None
    return ShiftMonitor(reference, predictor.threshold, window, predictor.positive_label)


def _data_url(png: bytes | None) -> str | None:
    """A PNG as a data URL the page can show without a second request."""
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")


ERRORS: dict[int | str, dict[str, Any]] = {  # the answers the OpenAPI docs list beside 200 and 422
    401: {"model": Problem, "description": "missing or wrong access token (only when the service has one)"},
    413: {"model": Problem, "description": "file too large (text/plain when the whole body is over the limit)"},
    415: {"model": Problem, "description": f"not an image, or not {ACCEPTED}"},
}


def create_app(predictor: Predictor | EnginePredictor, cfg: ServeConfig | None = None,
               token: str | None = None) -> FastAPI:
    """Build the service around one loaded predictor; every successful prediction is logged to the SQLite file
    `cfg.log_path` names (by default in the predictor's run folder).

    With a `token`, every /api request must send `Authorization: Bearer <token>` (else 401); it is an argument, not a
    setting, because settings are saved to disk. `cfg.reject_ood` withholds the label of images the run's guard
    calls out of distribution (the score is always given)."""
    cfg = cfg or ServeConfig()
    log = PredictionLog(cfg.log_path(predictor.spec.run_dir))
    batcher = Batcher(predictor, cfg.max_batch, cfg.max_wait_ms)
    page = (files("covidcxr.deploy.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            log.close()

    app = FastAPIOffline(
        title="covidcxr",
        summary="COVID-19 chest X-ray screening aid (not a diagnosis)",
        version=__version__,
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.batcher = batcher

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    app.include_router(_api(predictor, cfg, batcher, log, token))
    return app


def _api(predictor: Predictor | EnginePredictor, cfg: ServeConfig, batcher: Batcher, log: PredictionLog,
         token: str | None) -> APIRouter:
    """The /api routes: health and predict, behind the bearer token when there is one."""
    monitor = shift_monitor(predictor, cfg.shift_window)
    threads = anyio.CapacityLimiter(cfg.request_threads)
    api = APIRouter(prefix="/api", dependencies=[Depends(bearer_guard(token))] if token else [])

    @api.get("/health")
    async def health() -> Health:
        return Health(status="ok", engine=predictor.engine, model_id=predictor.model_id,
                      training=predictor.spec.training, positive_label=predictor.positive_label,
                      threshold=predictor.threshold, triage=predictor.spec.triage,
                      max_upload_bytes=cfg.max_upload_bytes, shift=monitor.status() if monitor else None)

    @api.post("/predict", responses=ERRORS, max_body_size=cfg.max_upload_bytes + MULTIPART_SLACK_BYTES)
    async def predict(
        file: UploadFile = File(description=f"chest X-ray: {ACCEPTED}"),
        cam: bool = Query(False, description="also return a Grad-CAM overlay"),
    ) -> Prediction:
        """Score one uploaded image. Errors: 413 too large; 415 not an image; 422 an image that cannot be used
        (no pixel data, corrupt, absurd size: `detail` is one line) or a malformed form (`detail` is a list)."""
        filename = file.filename or "upload"
        decode = partial(_decode_upload, predictor, file, filename, cfg.max_upload_bytes)
        digest, square = await anyio.to_thread.run_sync(decode, limiter=threads)
        probability, ood_score, accepted = await batcher.score(square)
        heatmap = (await batcher.explain(square))[1] if cam else None
        if monitor:
            monitor.add(probability)
        label = None if cfg.reject_ood and accepted is False else predictor.spec.label_for(probability)
        out = Prediction(probability=probability, label=label, in_distribution=accepted, ood_score=ood_score,
                         threshold=predictor.threshold, triage=predictor.spec.triage_for(probability),
                         model_id=predictor.model_id, heatmap=_data_url(heatmap),
                         sha256=digest)
        record = LogRecord(utc_now(), digest, filename, out.probability, out.label or WITHHELD, out.threshold,
                           out.model_id)
        log.add(record)  # on the loop: one short insert (WAL, no fsync) costs less than a thread hop
        return out

    return api
