"""Occlusion check: the model's scores with the lung fields blanked, and with only the lungs kept.

Blanked regions are set to one mid-gray level for all images (the mean content intensity of the set), not to black:
black is what the padding bars look like (their amount is itself a source cue) and a black hole makes a strong
artificial edge; not to each image's own mean, which would carry that image's brightness (a source cue too) into
the blanked version. "Lungs only" blanks everything else, padding, borders and burned-in text included.

Each AUC has a 95 % patient-bootstrap interval, and the fall of the AUC when the lungs are blanked ("auc_drop",
intact minus blanked) an interval from the same resamples (paired: the two AUCs share their images, so separate
intervals would overlap far more than the difference varies). verdict.py reads these.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from covidcxr.evaluation.bootstrap import bootstrap_aucs, patient_codes, percentile_interval
from covidcxr.evaluation.metrics import binary_metrics
from covidcxr.lungs.boxes import content_box
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
        top, bottom, left, right = content_box(img)
        total += float(img[top:bottom, left:right].sum(dtype=np.float64))
        count += (bottom - top) * (right - left)
    return int(round(total / max(count, 1)))


def occlusion_test(scorer: Scorer, images: np.ndarray, masks: np.ndarray, rows: pd.DataFrame, y: np.ndarray,
                   n_boot: int = 500) -> dict[str, Any]:
    """{"fill_level": the gray level occluded regions were set to, "conditions": per condition the AUC (with a
    patient-bootstrap CI), sensitivity and specificity at the run's threshold, and the scores; "auc_drop": intact
    minus lungs-blanked AUC with its paired CI}."""
    threshold, fill = scorer.spec.threshold, fill_level(images)
    conditions: dict[str, Any] = {}
    scores = []
    for condition in CONDITIONS:
        score = scorer.scores(np.ascontiguousarray(occlude(images, masks, condition, fill)))
        m = binary_metrics(y, score, threshold)
        scores.append(score)
        conditions[condition] = {"auc": m["auc"], "sensitivity": m["sensitivity"],
                                 "specificity": m["specificity"], "scores": score.round(5).tolist()}
    reps = bootstrap_aucs(y, scores, patient_codes(rows), n_boot)
    for condition, column in zip(CONDITIONS, reps.T):
        conditions[condition]["auc_ci95"] = list(percentile_interval(column))
    drop = conditions["intact"]["auc"] - conditions["lungs blanked"]["auc"]
    return {"fill_level": fill, "conditions": conditions,
            "auc_drop": {"value": drop, "ci95": list(percentile_interval(reps[:, 0] - reps[:, 1]))}}
