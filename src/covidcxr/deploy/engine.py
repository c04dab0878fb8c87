"""The service's lean scoring engine: a run's exported graph on onnxruntime, with no torch in the process.

torch alone makes a process ~530 MB resident (its CUDA build), more than a small server can spare beside the model,
so `covidcxr serve` makes each upload's cache square in numpy (`covidcxr.data.square`, torch's arithmetic) and scores
squares with an ONNX graph exported from the run's own torch code (`export --format serving`, parity-checked there
against the run's `Scorer`): `score.onnx` takes cache squares (N, S, S) uint8 and gives (N, 1) positive-class
probabilities of the run. The run's gate (RUN/gate.onnx, covidcxr.trust.gate) is onnxruntime everywhere already.

It lives in RUN/serving/ beside engine.json, which records the SHA-256 of the model.pt it was made from: a run whose
model changed is exported again (in a subprocess, so torch never loads here). The shift alarm is numpy code on the
engine's outputs. Grad-CAM needs gradients, so the first request for a heatmap loads the torch model beside the
engine (and the process grows by torch's size).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from covidcxr.data.reader import read_image
from covidcxr.data.square import to_square_np
from covidcxr.errors import InputError
from covidcxr.model.spec import RunSpec, file_sha256
from covidcxr.trust.gate import Gate, Verdict, verdicts

if TYPE_CHECKING:  # torch: imported at run time only once a heatmap is asked for
    from covidcxr.deploy.predict import Predictor

log = logging.getLogger(__name__)

ENGINE_DIR = "serving"
ENGINE_FILE = "engine.json"
SCORE_GRAPH = "score.onnx"


def fingerprint(run_dir: Path) -> dict[str, str | None]:
    """What an engine was exported from: the run's model."""
    return {"model_sha256": file_sha256(run_dir / "model.pt")}


def is_current(engine_dir: Path, run_dir: Path) -> bool:
    """True when engine_dir holds a graph exported from the run's present model.pt."""
    path = engine_dir / ENGINE_FILE
    if not (path.is_file() and (engine_dir / SCORE_GRAPH).is_file()):
        return False
    return json.loads(path.read_text()).get("fingerprint") == fingerprint(run_dir)


def ensure_engine(run_dir: str | Path) -> Path:
    """RUN/serving, exported first (in a subprocess: this process stays without torch) when missing or stale."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.pt").is_file():
        raise InputError(f"{run_dir}: no model.pt here; pass a run folder (covidcxr train --out)")
    engine_dir = run_dir / ENGINE_DIR
    if is_current(engine_dir, run_dir):
        log.debug("%s is current for %s: not exported again", engine_dir, run_dir)
        return engine_dir
    log.info("exporting %s to %s for onnxruntime (once per model) ...", run_dir, engine_dir)
    cmd = [sys.executable, "-m", "covidcxr.cli", "export", str(run_dir), "--format", "serving",
           "--out", str(engine_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise InputError(f"{run_dir}: the serving engine could not be exported ({why}); "
                         "serve it with --engine torch instead")
    return engine_dir


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxScorer:
    """The part of `covidcxr.scoring.Scorer` the service uses, on onnxruntime: cache squares, the gate, scores."""

    def __init__(self, engine_dir: str | Path, run_dir: str | Path, threads: int = 1):
        engine_dir, run_dir = Path(engine_dir), Path(run_dir)
        info = json.loads((engine_dir / ENGINE_FILE).read_text())
        self.spec = RunSpec.from_meta(info["meta"], run_dir, info["model_id"])
        self.gate = Gate.load(run_dir, threads)
        self._score = _session(engine_dir / SCORE_GRAPH, threads)

    def cache_square(self, image: np.ndarray) -> np.ndarray:
        """A decoded image (H, W) in [0, 1] -> the (S, S) uint8 square the cache would hold for it."""
        return to_square_np(image, self.spec.preprocess.cache_size, self.spec.preprocess.square)

    def scores(self, squares: np.ndarray) -> np.ndarray:
        """(N,) probability of the positive class for cache squares."""
        return self._score.run(None, {"squares": np.ascontiguousarray(squares, dtype=np.uint8)})[0][:, 0]


class EnginePredictor:
    """What the service needs of a `covidcxr.deploy.predict.Predictor`, on the engine."""

    engine = "onnxruntime"

    def __init__(self, scorer: OnnxScorer, threads: int = 1):
        self.scorer, self.spec, self.threads = scorer, scorer.spec, threads
        self.model_id, self.threshold = scorer.spec.model_id, scorer.spec.threshold
        self.positive_label = scorer.spec.positive_label
        self._explainer: Predictor | None = None  # the torch Predictor, loaded by the first Grad-CAM request

    @classmethod
    def from_run(cls, run_dir: str | Path, threads: int = 1) -> "EnginePredictor":
        return cls(OnnxScorer(ensure_engine(run_dir), run_dir, threads), threads)

    def read_bytes(self, data: bytes, filename: str) -> np.ndarray:
        """An uploaded file's bytes -> its cache square (raises ImageReadError for bad content)."""
        return self.scorer.cache_square(read_image(data, name=filename))

    def check(self, squares: np.ndarray) -> list[Verdict | None]:
        """The gate's verdict per cache square (None for each when the run has no gate)."""
        return verdicts(self.scorer.gate, squares)

    def explain(self, square: np.ndarray) -> tuple[float, bytes]:
        """(probability, Grad-CAM overlay PNG): the engine's probability, the torch model's gradients."""
        if self._explainer is None:
            from covidcxr.deploy.predict import Predictor, use_threads  # torch: only once a heatmap is asked for

            use_threads(self.threads)
            self._explainer = Predictor.from_run(self.spec.run_dir, "cpu")
        return float(self.scorer.scores(square[None])[0]), self._explainer.explain(square)[1]
