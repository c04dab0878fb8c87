"""What a run's checkpoint says about turning an image into a decision (classes, threshold, preprocessing settings),
readable without torch: the scorer (`covidcxr.scoring`) and the service's onnxruntime engine both build on it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidcxr.preprocess.spec import PreprocessSpec


@dataclass(frozen=True)
class RunSpec:
    """What a run's checkpoint says about turning an image into a decision."""

    run_dir: Path
    arch: str
    task: str
    classes: tuple[str, ...]
    positive_index: int
    threshold: float
    threshold_method: str
    preprocess: PreprocessSpec
    model_id: str
    weights: str = ""  # the weights training started from: imagenet, none (random) or a checkpoint's path
    triage: dict | None = field(default=None)  # RUN/triage.json (covidcxr calibrate --triage), None without one

    @classmethod
    def from_meta(cls, meta: dict, run_dir: str | Path = "", model_id: str = "") -> "RunSpec":
        return cls(Path(run_dir), meta["arch"], meta["task"], tuple(meta["classes"]), int(meta["positive_index"]),
                   float(meta["threshold"]) if meta.get("threshold") is not None else float("nan"),
                   str(meta.get("threshold_method", "")), PreprocessSpec.from_meta(meta), model_id,
                   str(meta.get("weights_used", "")), read_triage(Path(run_dir)) if str(run_dir) else None)

    @property
    def training(self) -> str:
        """How the weights came about, in plain words: transfer learning or not is the first thing a site asks."""
        return training_kind(self.weights, self.arch)

    def triage_for(self, probability: float) -> str | None:
        """The triage class of a probability under the run's triage thresholds; None when the run has none."""
        return triage_class(probability, self.triage) if self.triage else None

    @property
    def positive_label(self) -> str:
        return self.classes[self.positive_index]

    @property
    def negative_label(self) -> str:
        return self.classes[0] if len(self.classes) == 2 else "non-" + self.positive_label

    def label_for(self, probability: float) -> str:
        return self.positive_label if probability >= self.threshold else self.negative_label


TRIAGE_FILE = "triage.json"
RULE_OUT, RULE_IN, READER = "rule-out", "rule-in", "needs a reader"


def read_triage(run_dir: Path) -> dict | None:
    """RUN/triage.json (rule_out_max, rule_in_min and the guarantee they come with), None when absent."""
    path = run_dir / TRIAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def triage_class(probability: float, triage: dict) -> str:
    """rule-out at or below `rule_out_max`, rule-in at or above `rule_in_min` (a null bound: that class is empty;
    rule-in wins should the two overlap), everything else needs a reader."""
    return str(triage_classes(np.array([probability]), triage)[0])


def triage_classes(probabilities: np.ndarray, triage: dict) -> np.ndarray:
    """`triage_class` of many probabilities at once."""
    p = np.asarray(probabilities, float)
    low, high = triage.get("rule_out_max"), triage.get("rule_in_min")
    classes = np.full(p.shape, READER, dtype=object)
    if low is not None:
        classes[p <= low] = RULE_OUT
    if high is not None:
        classes[p >= high] = RULE_IN
    return classes


def training_kind(weights: str, arch: str = "") -> str:
    """'transfer learning from ImageNet', 'trained from scratch (random initialisation)' or 'fine-tuned from PATH'."""
    model = f"gray {arch} " if arch else ""
    if weights == "imagenet":
        return f"{model}transfer learning from ImageNet weights"
    if weights in ("none", ""):
        return f"{model}trained from scratch (random initialisation, no transfer learning)" if weights else \
            f"{model}(weights it started from not recorded)"
    return f"{model}fine-tuned from {weights}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks (a checkpoint is hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def model_id(run_dir: Path, which: str = "model.pt") -> str:
    """`<run folder name>-<first 8 hex of the checkpoint's SHA-256>`: names the exact weights in logs and reports."""
    return f"{run_dir.resolve().name}-{file_sha256(run_dir / which)[:8]}"
