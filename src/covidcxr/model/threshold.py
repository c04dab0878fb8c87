"""The operating threshold a run is used at: chosen on validation predictions only, stored with the model."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve

from covidcxr.config import THRESHOLD_CHOICES
from covidcxr.errors import InputError

FIT_RIDGE = 1e4  # inverse ridge strength of the youden-fit logistic: weak, but finite when the classes separate


def choose_threshold(
    y: Any, score: Any, method: str = "youden", target_sensitivity: float = 0.95,
    requirements: tuple[float, float] | None = None,
) -> float:
    """Decision threshold from VALIDATION predictions (the caller guarantees which split it passes).

    youden: maximises sensitivity + specificity - 1 over the observed scores (ties: the highest such score);
    youden-fit: the same optimum read from a logistic fit of the label on the score's log-odds (fitted_youden);
    sensitivity: the highest observed score whose sensitivity reaches `target_sensitivity`;
    requirements: the observed score where sensitivity and specificity clear `requirements` (minimum sensitivity,
    minimum specificity) by the widest common margin, max of min(sensitivity - S, specificity - P) (ties: the highest
    such score). Where both can be met this leaves the same room to each; where they cannot, it shares the shortfall.
    Sensitivity falls and specificity rises with the threshold, so the optimum is where the two margins cross, which
    one image moves by one image's share (Youden's flat top lets it jump).
    """
    y_arr, s_arr = np.asarray(y), np.asarray(score, dtype=float)
    if y_arr.min() == y_arr.max():
        raise InputError("choosing a threshold needs both classes in the validation predictions")
    if method == "youden-fit":
        fitted = fitted_youden(y_arr, s_arr)
        if fitted is not None:
            return fitted
        method = "youden"  # the scores do not rise with the label: no fit to read, the observed optimum stands
    fpr, tpr, thresholds = roc_curve(y_arr, s_arr, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the 'call nobody positive' point (inf)
    if method == "youden":
        best = int(np.argmax(tpr - fpr))
    elif method == "requirements":
        if requirements is None:
            raise InputError("threshold method requirements needs (minimum sensitivity, minimum specificity)")
        min_sensitivity, min_specificity = requirements
        best = int(np.argmax(np.minimum(tpr - min_sensitivity, (1 - fpr) - min_specificity)))
    elif method == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise InputError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        best = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # tpr ends at 1, so a match exists
    else:
        raise InputError(f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLD_CHOICES)} (calibrate "
                         "also aims at a site's requirements)")
    return float(thresholds[best])


def fitted_youden(y: np.ndarray, score: np.ndarray) -> float | None:
    """Youden's optimum where the likelihood ratio of the two classes' scores is 1, i.e. where the posterior equals
    the sample's prevalence, with the posterior from a logistic fit on logit(score) (Platt's two parameters).

    On a few dozen images of each class the observed maximum of sensitivity + specificity sits anywhere on its flat
    top, and one image moves it; the fit uses every score. None when the fitted slope is not positive."""
    z = logit(np.clip(score, 1e-7, 1 - 1e-7)).reshape(-1, 1)
    fit = LogisticRegression(C=FIT_RIDGE).fit(z, y)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope <= 0:
        return None
    return float(expit((logit(np.mean(y)) - intercept) / slope))
