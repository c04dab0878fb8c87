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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.resources import files
from pathlib import Path
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
from covidcxr.data.tasks import LABELS
from covidcxr.deploy.loop.keep import dicom_ids, keep_image
from covidcxr.deploy.loop.monitor import current
from covidcxr.deploy.serve.access import bearer_guard
from covidcxr.deploy.serve.batcher import Batcher
from covidcxr.deploy.serve.log import LogRecord, PredictionLog, utc_now
from covidcxr.errors import InputError
from covidcxr.trust.shift import ShiftMonitor

if TYPE_CHECKING:  # torch's Predictor or the engine's EnginePredictor: the same interface
    from covidcxr.deploy.engine import EnginePredictor
    from covidcxr.deploy.predict import Predictor

MULTIPART_SLACK_BYTES = 64 * 1024  # form framing around the file; the file itself is checked exactly
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
ACCEPTED = "PNG, JPEG, TIFF, BMP or DICOM"
MONITOR_TTL_S = 5.0  # /api/health recomputes the monitor's current window at most this often


class Prediction(BaseModel):
    prediction_id: int = Field(description="this prediction's id in the log: send it back with a reader's verdict "
                                           "(POST /api/feedback)")
    probability: float = Field(description="probability of the positive class, in [0, 1]")
    label: str = Field(description="label at the threshold")
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
    negative_label: str = Field(description="the label a reader gives when disagreeing with a positive call")
    threshold: float
    triage: dict | None = Field(default=None, description="the run's triage thresholds and their guarantee; null "
                                                          "without")
    max_upload_bytes: int
    shift: dict | None = Field(description="the shift alarm over the latest full batch of predictions against the "
                                           "run's validation scores (alarm, rates, p-values, message); null without "
                                           "validation scores")
    monitor: dict | None = Field(description="the monitor's current window of this model (volume, refusals, share "
                                             "called positive, shift alarm, agreement with readers) and the latest "
                                             "alert of the sequential test on the readers' disagreement")


class Feedback(BaseModel):
    prediction_id: int = Field(description="the prediction_id of a /api/predict answer")
    label: str = Field(description="the reader's verdict: covid, normal, pneumonia or other")
    reader: str | None = Field(None, description="who read the film (free text)")
    comment: str | None = Field(None, description="free text")


class VerdictRecorded(BaseModel):
    verdict_id: int
    prediction_id: int
    label: str
    history: int = Field(description="verdicts recorded on this prediction so far, this one included (the latest "
                                     "counts; earlier ones are kept)")


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


@dataclass
class Upload:
    """An upload as the log knows it: its hash, the DICOM UIDs and patient id it carried, where it was kept."""

    sha256: str
    ids: dict[str, str | None] = field(default_factory=dict)
    image_path: str | None = None


class Unusable(Exception):
    """An image that was read but is not scored: logged with its status (unreadable, or refused: not a frontal chest
    radiograph) and the bare reason, which `monitor` counts refusals by (the log has the file name in its own column,
    as a PACS watcher's has the instance's UID); answered 422 with `detail`, which names the file."""

    def __init__(self, upload: Upload, reason: str, detail: str, status: str = "unreadable"):
        super().__init__(detail)
        self.upload, self.reason, self.detail, self.status = upload, reason, detail, status


def _decode_upload(predictor: Predictor | EnginePredictor, file: UploadFile, filename: str, limit: int,
                   keep: str | None, patient_id: str | None) -> tuple[Upload, np.ndarray]:
    """(what the log keeps of the upload, its cache square): everything before the model, the gate included, run on a
    request thread; an image the gate refuses is Unusable with the gate's reason."""
    data = _read_upload(file, filename, limit)
    _require_image_content(data, filename)
    upload = Upload(hashlib.sha256(data).hexdigest(), dicom_ids(data))
    if patient_id:
        upload.ids["patient_id"] = patient_id
    try:
        square = predictor.read_bytes(data, filename)
    except ImageReadError as exc:
        raise Unusable(upload, exc.reason, str(exc)) from None
    verdict = predictor.check(square[None])[0]
    if verdict is not None and not verdict.accepted:
        reason = verdict.reason or ""
        raise Unusable(upload, reason, f"{filename}: refused: {reason}", "refused")
    if keep:
        upload.image_path = keep_image(data, upload.sha256, keep)
    return upload, square


def shift_monitor(predictor: Predictor | EnginePredictor, batch: int, log: PredictionLog) -> ShiftMonitor | None:
    """The stream's shift alarm against the run's validation scores (recorded in the log, with the model, for
    `monitor`); None for a run without them (e.g. a random one)."""
    reference = log.record_run(predictor.spec.run_dir, predictor.model_id, predictor.threshold,
                               predictor.positive_label)
    return None if reference is None else ShiftMonitor(reference, predictor.threshold, batch, predictor.positive_label)


class MonitorView:
    """The monitor's current window for /api/health, recomputed at most every MONITOR_TTL_S on a worker thread."""

    def __init__(self, db: Path, model_id: str, window: str):
        self.db, self.model_id, self.window = db, model_id, window
        self.value: dict | None = None
        self.at = -MONITOR_TTL_S

    async def get(self) -> dict | None:
        if time.monotonic() - self.at >= MONITOR_TTL_S:
            self.value = await anyio.to_thread.run_sync(current, self.db, self.model_id, self.window)
            self.at = time.monotonic()
        return self.value

    def stale(self) -> None:
        """A verdict changes agreement and the sequential test: the next health call recomputes."""
        self.at = -MONITOR_TTL_S


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
    setting, because settings are saved to disk."""
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
    """The /api routes: health, predict and feedback, behind the bearer token when there is one."""
    monitor = shift_monitor(predictor, cfg.shift_batch, log)
    view = MonitorView(log.path, predictor.model_id, cfg.monitor_window)
    threads = anyio.CapacityLimiter(cfg.request_threads)
    negative = predictor.spec.negative_label if predictor.spec.negative_label in LABELS else "normal"
    api = APIRouter(prefix="/api", dependencies=[Depends(bearer_guard(token))] if token else [])

    @api.get("/health")
    async def health() -> Health:
        return Health(status="ok", engine=predictor.engine, model_id=predictor.model_id,
                      training=predictor.spec.training, positive_label=predictor.positive_label,
                      negative_label=negative, threshold=predictor.threshold, triage=predictor.spec.triage,
                      max_upload_bytes=cfg.max_upload_bytes, shift=monitor.status() if monitor else None,
                      monitor=await view.get())

    @api.post("/predict", responses=ERRORS, max_body_size=cfg.max_upload_bytes + MULTIPART_SLACK_BYTES)
    async def predict(
        file: UploadFile = File(description=f"chest X-ray: {ACCEPTED}"),
        cam: bool = Query(False, description="also return a Grad-CAM overlay"),
        patient_id: str | None = Query(None, description="the patient's id, logged with the prediction so that "
                                                         "`feedback export` can keep a patient's images together "
                                                         "(a DICOM upload's own PatientID is used when not given)"),
    ) -> Prediction:
        """Score one uploaded image. Errors: 413 too large; 415 not an image; 422 an image that is not scored,
        logged with its reason: the gate refused it (not a frontal chest radiograph: `detail` says why and, for a
        turned or inverted film, how to fix it) or it cannot be used (no pixel data, corrupt, absurd size), `detail`
        one line; or a malformed form (`detail` is a list)."""
        filename = file.filename or "upload"
        decode = partial(_decode_upload, predictor, file, filename, cfg.max_upload_bytes, cfg.keep_images, patient_id)
        try:
            upload, square = await anyio.to_thread.run_sync(decode, limiter=threads)
        except Unusable as exc:
            log.refuse(exc.upload.sha256, filename, exc.status, exc.reason, predictor.model_id, predictor.threshold,
                       exc.upload.ids, "serve")
            raise HTTPException(422, exc.detail) from None
        probability = await batcher.score(square)
        heatmap = (await batcher.explain(square))[1] if cam else None
        if monitor:
            monitor.add(probability)
        label = predictor.spec.label_for(probability)
        record = LogRecord(utc_now(), upload.sha256, filename, probability, label, predictor.threshold,
                           predictor.model_id, image_path=upload.image_path, origin="serve")
        prediction_id = log.add(record, upload.ids)  # on the loop: one insert (WAL, no fsync) beats a thread hop
        return Prediction(prediction_id=prediction_id, probability=probability, label=label,
                          threshold=predictor.threshold, triage=predictor.spec.triage_for(probability),
                          model_id=predictor.model_id, heatmap=_data_url(heatmap), sha256=upload.sha256)

    @api.post("/feedback", responses={404: {"model": Problem, "description": "no such prediction in the log"}})
    async def feedback(verdict: Feedback) -> VerdictRecorded:
        """Record a reader's verdict on a prediction (confirming or correcting it). Recording again keeps the earlier
        verdicts as history; the latest counts. Errors: 404 unknown prediction_id; 422 a label that is not one of
        covid, normal, pneumonia, other."""
        try:
            verdict_id = log.add_verdict(verdict.prediction_id, verdict.label, verdict.reader, verdict.comment)
        except KeyError:
            raise HTTPException(404, f"prediction {verdict.prediction_id} is not in this service's log") from None
        except InputError as exc:
            raise HTTPException(422, str(exc)) from None
        view.stale()
        return VerdictRecorded(verdict_id=verdict_id, prediction_id=verdict.prediction_id, label=verdict.label,
                               history=len(log.verdicts(verdict.prediction_id)))

    return api
