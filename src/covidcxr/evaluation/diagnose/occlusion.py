"""Occlusion check: the model's scores with the lung fields blanked, and with only the lungs kept.

Blanked regions are set to one mid-gray level for all images (the mean content intensity of the set), not to black:
black is what the padding bars look like (their amount is itself a source cue) and a black hole makes a strong
artificial edge; not to each image's own mean, which would carry that image's brightness (a source cue too) into
the blanked version. "Lungs only" blanks everything else, padding, borders and burned-in text included.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.lungs import heuristic as lungs
from covidcxr.evaluation.metrics import binary_metrics, bootstrap_ci
from covidcxr.scoring import Scorer

CONDITIONS = ("intact", "lungs blanked", "lungs only")


def occlude(images: np.ndarray, masks: np.ndarray, condition: str, fill: int) -> np.ndarray:
    """uint8 images with the lungs (or everything but the lungs) set to the gray level `fill`."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown occlusion {condition!r}; choose one of {', '.join(CONDITIONS)}")
    if condition == "intact":
        return images
    blank = masks if condition == "lungs blanked" else ~masks
    return np.where(blank, np.uint8(fill), images)


def fill_level(images: np.ndarray) -> int:
    """One gray level for every image: the mean intensity of the image content (padding left out) over the set.

    A per-image mean would carry the image's own brightness into the occluded version, and brightness differs
    between sources; black would look like padding. One mid-gray level for all carries nothing.
    """
    total, count = 0.0, 0
    for img in images:
        top, bottom, left, right = lungs.content_box(img)
        total += float(img[top:bottom, left:right].sum(dtype=np.float64))
        count += (bottom - top) * (right - left)
    return int(round(total / max(count, 1)))


def occlusion_test(scorer: Scorer, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, y: np.ndarray,
                   n_boot: int = 500) -> dict[str, Any]:
    """{"fill_level": the gray level occluded regions were set to, "conditions": per condition the AUC (with a
    patient-bootstrap CI), sensitivity and specificity at the run's threshold, and the scores}."""
    threshold, fill = scorer.spec.threshold, fill_level(images)
    conditions: dict[str, Any] = {}
    for condition in CONDITIONS:
        score = scorer.scores(np.ascontiguousarray(occlude(images, masks, condition, fill)))
        m = binary_metrics(y, score, threshold)
        frame = rows[["path", "source", "patient_id"]].assign(y=y, score=score)
        auc_ci = bootstrap_ci(frame, threshold, n_boot)["auc"] if 0 < y.sum() < len(y) else (math.nan, math.nan)
        conditions[condition] = {"auc": m["auc"], "auc_ci95": list(auc_ci), "sensitivity": m["sensitivity"],
                                 "specificity": m["specificity"], "scores": score.round(5).tolist()}
    return {"fill_level": fill, "conditions": conditions}

