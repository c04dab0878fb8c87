"""What a run's checkpoint says about turning an image into a decision (classes, threshold, preprocessing settings),
readable without torch: the scorer (`covidcxr.scoring`) and the service's onnxruntime engine both build on it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

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

    @classmethod
    def from_meta(cls, meta: dict, run_dir: str | Path = "", model_id: str = "") -> "RunSpec":
        return cls(Path(run_dir), meta["arch"], meta["task"], tuple(meta["classes"]), int(meta["positive_index"]),
                   float(meta["threshold"]) if meta.get("threshold") is not None else float("nan"),
                   str(meta.get("threshold_method", "")), PreprocessSpec.from_meta(meta), model_id)

    @property
    def positive_label(self) -> str:
        return self.classes[self.positive_index]

    @property
    def negative_label(self) -> str:
        return self.classes[0] if len(self.classes) == 2 else "non-" + self.positive_label

    def label_for(self, probability: float) -> str:
        return self.positive_label if probability >= self.threshold else self.negative_label


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
