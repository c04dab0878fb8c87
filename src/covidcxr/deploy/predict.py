"""Scoring image files with a trained run: decode once, the run's `Scorer` for the rest, batched.

`Predictor` is what the CLI, the HTTP service and the PACS use, so a file is scored one way everywhere; a file
scores exactly as its cached copy does in `evaluate`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covidcxr.data.reader import ImageReadError, read_image
from covidcxr.data.sources import IMAGE_SUFFIXES, file_problem, image_files
from covidcxr.errors import ImageRefused, InputError
from covidcxr.scoring import Scorer
from covidcxr.trust.gate import Verdict, verdicts

SCORED, REFUSED, UNREADABLE = "scored", "refused", "unreadable"


@dataclass
class Prediction:
    """One file's answer: `status` scored (with probability and label), refused (not a frontal chest radiograph:
    no probability, since an X-ray model's score on anything else means nothing) or unreadable; `reason` says why."""

    path: str
    status: str
    reason: str | None
    probability: float | None
    label: str | None
    threshold: float
    triage: str | None = None  # rule-out | rule-in | needs a reader, when the run has triage thresholds (triage.json)


class Predictor:
    """Scores files with a run (through its `Scorer`), one way for the CLI, the service and the PACS."""

    engine = "torch"

    def __init__(self, scorer: Scorer) -> None:
        """Wrap a run's scorer; the threshold and labels come from its spec, so every caller labels alike."""
        self.scorer = scorer
        self.spec = scorer.spec
        self.model_id, self.threshold = scorer.spec.model_id, scorer.spec.threshold
        self.positive_label = scorer.spec.positive_label

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        """The predictor of a run folder (model, threshold, gate), the way every entry point loads one."""
        return cls(Scorer.from_run(run_dir, device))

    def square(self, image: np.ndarray) -> np.ndarray:
        """A decoded image -> its uint8 cache square (what `ingest` would store)."""
        return self.scorer.cache_square(image)

    def read_squares(self, paths: list[Path]) -> tuple[dict[str, np.ndarray], list[Prediction]]:
        """Decode each file once: {path: cache square} for the readable ones, a refused or unreadable row for each
        of the rest."""
        squares, failed = {}, []
        for path in paths:
            try:
                squares[str(path)] = self.square(read_image(path))
            except ImageReadError as exc:
                failed.append(failed_row(str(path), exc, self.threshold))
        return squares, failed

    def check(self, squares: np.ndarray) -> list[Verdict | None]:
        """The gate's verdict per cache square; None for each when the run has no gate."""
        return verdicts(self.scorer.gate, squares)

    def predict_squares(self, squares: dict[str, np.ndarray], batch_size: int = 32) -> list[Prediction]:
        """Gate, then score in batches what the gate accepts."""
        names, results = list(squares), []
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            stack = np.stack([squares[n] for n in chunk])
            verdicts = self.check(stack)
            keep = [i for i, v in enumerate(verdicts) if v is None or v.accepted]
            scores = dict(zip(keep, self.scorer.scores(stack[keep]))) if keep else {}
            for i, name in enumerate(chunk):
                verdict = verdicts[i]
                if i in scores:
                    p = float(scores[i])
                    results.append(Prediction(name, SCORED, None, p, self.spec.label_for(p), self.threshold,
                                              self.spec.triage_for(p)))
                else:
                    assert verdict is not None  # only the gate leaves an image unscored
                    results.append(Prediction(name, REFUSED, verdict.reason, None, None, self.threshold))
        return results

    def predict_paths(self, paths: list[Path], batch_size: int = 32) -> list[Prediction]:
        """Score files; an unreadable file gets its own Prediction with the reason, the others go on."""
        squares, failed = self.read_squares(paths)
        results = self.predict_squares(squares, batch_size) + failed
        order = {str(p): i for i, p in enumerate(paths)}
        return sorted(results, key=lambda r: order[r.path])

    def read_bytes(self, data: bytes, filename: str) -> np.ndarray:
        """An uploaded file's bytes -> its cache square (raises ImageReadError for bad content)."""
        return self.square(read_image(data, name=filename))

    def explain(self, square: np.ndarray) -> tuple[float, bytes]:
        """(probability, Grad-CAM overlay PNG) for one cache square."""
        # imported here: grad-cam brings OpenCV and scikit-learn, ~150 MB that a server without CAM requests never needs
        from covidcxr.model.cam import cam_overlay_png
        return float(self.scorer.scores(square[None])[0]), cam_overlay_png(self.scorer, square)


def failed_row(path: str, exc: ImageReadError, threshold: float) -> Prediction:
    """A file that was not scored: refused by its DICOM tags, or unreadable."""
    return Prediction(path, REFUSED if isinstance(exc, ImageRefused) else UNREADABLE, exc.reason, None, None, threshold)


def use_threads(threads: int) -> None:
    """Torch's intra-op threads for this process (one forward pass spread over them); at least one."""
    if threads < 1:
        raise InputError(f"--threads {threads}: give at least 1")
    torch.set_num_threads(threads)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[Prediction]]:
    """Files as given plus image files found in folders (recursively); missing inputs, broken links, folders that
    cannot be read and folders without image files become error rows, so every input shows up in the output."""
    paths, errors = [], []
    for item in inputs:
        p = Path(item)
        found = image_files(p) if p.is_dir() else [p]
        if not found:
            errors.append(Prediction(str(p), UNREADABLE,
                                     f"folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})", None, None,
                                     float("nan")))
        for path in found:
            problem = file_problem(path)
            if problem:
                errors.append(Prediction(str(path), UNREADABLE, problem, None, None, float("nan")))
            else:
                paths.append(path)
    return paths, errors


def format_predictions(results: list[Prediction], fmt: str) -> str:
    """`covidcxr predict`'s output as json, csv or an aligned table; error rows keep their place in each."""
    rows = [r.__dict__ for r in results]
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    width = max([len(r.path) for r in results] + [4])
    lines = [f"{'file':<{width}}  {'P(covid)':>8}  {'label':<10} threshold"
             + ("  triage" if any(r.triage for r in results) else "")]
    for r in results:
        if r.status == SCORED:
            triage = f"  {r.triage}" if r.triage else ""
            lines.append(f"{r.path:<{width}}  {r.probability:>8.3f}  {r.label:<10} {r.threshold:.3f}{triage}")
        else:
            lines.append(f"{r.path:<{width}}  {'-':>8}  {r.status.upper():<10} {r.reason}")
    return "\n".join(lines)


def predict_files(run: str | Path, inputs: list[str], cam_dir: str | Path | None = None,
                  batch_size: int = 32) -> list[Prediction]:
    """`covidcxr predict`: one Prediction per file (a refused or unreadable row for each file or folder that was not
    scored), and a Grad-CAM overlay per scored file in `cam_dir`, from the same decoded image."""
    predictor = Predictor.from_run(run)
    paths, missing = expand_inputs(inputs)
    squares, failed = predictor.read_squares(paths)
    results = predictor.predict_squares(squares, batch_size) + failed
    order = {str(p): i for i, p in enumerate(paths)}
    results = sorted(results, key=lambda r: order[r.path]) + missing
    for r in results:
        r.threshold = predictor.threshold
    if cam_dir:
        from covidcxr.model.cam import write_cams
        scored = {r.path for r in results if r.status == SCORED}
        write_cams(predictor.scorer, [(Path(n), sq) for n, sq in squares.items() if n in scored], Path(cam_dir))
    return results
