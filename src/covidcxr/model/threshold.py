"""The operating threshold a run is used at: chosen on validation predictions only, stored with the model."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from covidcxr.config import THRESHOLD_CHOICES
from covidcxr.errors import InputError


def choose_threshold(
    y: Any, score: Any, method: str = "youden", target_sensitivity: float = 0.95
) -> float:
    """Decision threshold from VALIDATION predictions (the caller guarantees which split it passes).

    youden: maximises sensitivity + specificity - 1; sensitivity: the highest threshold whose sensitivity
    reaches `target_sensitivity`. The result is one of the observed scores (ties: the highest such score).
    """
    y_arr, s_arr = np.asarray(y), np.asarray(score, dtype=float)
    if y_arr.min() == y_arr.max():
        raise InputError("choosing a threshold needs both classes in the validation predictions")
    fpr, tpr, thresholds = roc_curve(y_arr, s_arr, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the 'call nobody positive' point (inf)
    if method == "youden":
        best = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise InputError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # tpr ends at 1, so a match exists
    else:
        raise InputError(f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLD_CHOICES)}")
    return float(thresholds[best])
