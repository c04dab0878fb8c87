"""One DICOM instance from a PACS or a modality -> skipped, refused, failed, or scored with its report stored; all
recorded.

`watch` and `listen` differ only in how instances arrive and how reports leave (the `store` callable), so both get
exactly this: the chest check, `covidcxr predict`'s gate and scoring of the file, the SR (and Grad-CAM capture), the
state. An instance the gate refuses gets no finding in the PACS; its reason is in the state.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from covidcxr.data.reader import read_image
from covidcxr.deploy.loop.keep import dataset_ids
from covidcxr.deploy.predict import Prediction, Predictor
from covidcxr.deploy.serve.log import LogRecord, PredictionLog, utc_now
from covidcxr.hospital.pacs import StoreRefused
from covidcxr.hospital.sr import cam_capture, finding, structured_report
from covidcxr.hospital.state import MAX_ATTEMPTS, State

log = logging.getLogger(__name__)

CHEST_MODALITIES = ("CR", "DX", "DR")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")


def not_chest(modality: str | None, body_part: str | None = None) -> str | None:
    """Why an instance is not a chest radiograph, or None when it may be one (a missing body part is allowed:
    many radiography units leave it out)."""
    if (modality or "").upper() not in CHEST_MODALITIES:
        return f"modality {modality or '(none)'} is not a radiograph ({'/'.join(CHEST_MODALITIES)})"
    if body_part and body_part.upper() not in CHEST_BODY_PARTS:
        return f"body part {body_part} is not the chest"
    return None


def prediction_log(state_path: str | Path, predictor: Predictor) -> PredictionLog:
    """The prediction log of a watcher or listener: in its state file, so `monitor` and `feedback` take that file as
    they take a service's log."""
    predictions = PredictionLog(state_path)
    predictions.record_run(predictor.spec.run_dir, predictor.model_id, predictor.threshold, predictor.positive_label)
    return predictions


@dataclass
class Result:
    status: str  # scored | skipped (not a radiograph by its tags) | refused (by the gate) | failed | pending
    reason: str | None = None
    prediction: Prediction | None = None
    outputs: list[Dataset] = field(default_factory=list)
    sha256: str = ""  # of the instance as scored (written as a DICOM file)
    image_path: str | None = None  # where it was kept (--keep-images)


class Screener:
    """Scores instances with one run and hands their reports to `store`, recording every outcome in `state`, and in
    the prediction log `predictions` (with the instance's UIDs, so imported verdicts match; the file kept in `keep`
    if given)."""

    def __init__(self, predictor: Predictor, state: State, store: Callable[[list[Dataset], str | None], None],
                 cam: bool = False, predictions: PredictionLog | None = None, keep: str | None = None):
        self.predictor, self.state, self.store, self.cam = predictor, state, store, cam
        self.predictions, self.keep = predictions, keep

    def handle(self, ds: Dataset) -> Result:
        """Assess one instance, store its report, record it; PacsUnavailable propagates and leaves it unrecorded."""
        uid, study = str(ds.SOPInstanceUID), str(ds.get("StudyInstanceUID", "")) or None
        result = self.assess(ds)
        if result.status == "scored":
            try:
                self.store(result.outputs, study)
            except StoreRefused as exc:
                return self.retry_later(uid, study, str(exc))
            for output in result.outputs:
                self.state.record(str(output.SOPInstanceUID), study, "output", reason=f"written for {uid}")
        p = result.prediction
        self.state.record(uid, study, result.status, reason=result.reason, model_id=self.predictor.model_id,
                          **({} if p is None or p.status != "scored" else _columns(p, result.outputs)))
        self.log_result(result, dataset_ids(ds))
        return self.report(uid, result)

    def log_result(self, result: Result, ids: dict[str, str | None]) -> None:
        """The prediction log's row: scored with its probability, or refused (not a chest radiograph) or unreadable
        with the reason."""
        if self.predictions is None:
            return
        p, model_id, threshold = result.prediction, self.predictor.model_id, self.predictor.threshold
        name = ids.get("sop_uid") or "instance"
        if result.status == "scored" and p is not None:
            self.predictions.add(LogRecord(utc_now(), result.sha256, name, p.probability, p.label, threshold, model_id,
                                           image_path=result.image_path, origin="pacs"), ids)
        else:
            status = "refused" if result.status in ("skipped", "refused") else "unreadable"
            self.predictions.refuse(result.sha256, name, status,
                                    result.reason or "", model_id, threshold, ids, "pacs")

    def skip(self, uid: str, study: str | None, reason: str) -> Result:
        """Record an instance that is not scored, known before it is retrieved (e.g. a CT from its search answer)."""
        self.state.record(uid, study, "skipped", reason=reason)
        self.log_result(Result("skipped", reason), {"study_uid": study, "sop_uid": uid})
        return self.report(uid, Result("skipped", reason))

    def retry_later(self, uid: str, study: str | None, reason: str) -> Result:
        """A transient refusal: tried again on the next poll, final after MAX_ATTEMPTS."""
        if self.state.postpone(uid, study, reason):
            return self.report(uid, Result("failed", f"gave up after {MAX_ATTEMPTS} attempts: {reason}"))
        return self.report(uid, Result("pending", reason))

    def assess(self, ds: Dataset) -> Result:
        """Skip what is not a chest radiograph, score the rest as `covidcxr predict` scores the same file."""
        reason = not_chest(ds.get("Modality"), ds.get("BodyPartExamined"))
        if reason:
            return Result("skipped", reason)
        with tempfile.TemporaryDirectory(prefix="covidcxr-pacs-") as tmp:
            path = Path(tmp) / "instance.dcm"
            try:
                ds.save_as(path, enforce_file_format=True)
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                return Result("failed", f"cannot write the DICOM dataset ({exc})".splitlines()[0])
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            prediction = self.predictor.predict_paths([path])[0]
            if prediction.status != "scored":  # refused by the gate (no finding is written), or unreadable
                return Result("refused" if prediction.status == "refused" else "failed", prediction.reason,
                              prediction, sha256=digest)
            try:
                outputs: list[Dataset] = [structured_report(ds, prediction, self.predictor.model_id)]
                if self.cam:
                    outputs.append(cam_capture(ds, self._overlay(path), self.predictor.model_id))
            except (ValueError, TypeError, AttributeError) as exc:  # highdicom refuses unusable patient/study data
                return Result("failed", f"cannot build the report ({exc})".splitlines()[0], prediction, sha256=digest)
            kept = self._kept(path, digest) if self.keep else None
        return Result("scored", None, prediction, outputs, sha256=digest, image_path=kept)

    def _kept(self, path: Path, digest: str) -> str:
        """Keep the scored instance, named by its hash, for `feedback export`."""
        assert self.keep is not None
        target = Path(self.keep) / f"{digest}.dcm"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        return str(target.resolve())

    def _overlay(self, path: Path) -> np.ndarray:
        from covidcxr.model.cam import cam_overlay
        return np.asarray(cam_overlay(self.predictor.scorer, self.predictor.square(read_image(path))).convert("RGB"))

    def report(self, uid: str, result: Result) -> Result:
        """One log line per instance: scored and skipped as info, postponements as warnings, failures as errors."""
        if result.status == "scored":
            p = result.prediction
            assert p is not None  # assess gives every scored result its prediction
            log.info("scored %s: P(covid) %.3f, %s (threshold %.3f); report %s", uid, p.probability,
                     finding(p).meaning, p.threshold, result.outputs[0].SOPInstanceUID)
        elif result.status in ("skipped", "refused"):
            log.info("%s %s: %s", result.status, uid, result.reason)
        elif result.status == "pending":
            log.warning("%s: %s; will try again (at most %d attempts)", uid, result.reason, MAX_ATTEMPTS)
        else:
            log.error("cannot score %s: %s", uid, result.reason)
        return result


def _columns(p: Prediction, outputs: list[Dataset]) -> dict:
    return {"probability": p.probability, "label": p.label, "threshold": p.threshold,
            "report_uid": str(outputs[0].SOPInstanceUID) if outputs else None}
