"""Image-statistics check: how well non-anatomical features alone (size and aspect before resizing, padding and
border, intensity histogram, sharpness and noise) predict the label, cross-validated by patient (crossval.py),
with a patient-bootstrap interval. High means the data itself carries a shortcut, whatever the model does.

The classifier fits the sample: below crossval.SMALL_SAMPLE images a regularised logistic regression, from there
gradient boosting, which also finds shortcuts no linear score shows (each source's own film sizes: on 304 real films
from 7 collections, size and aspect gave AUC 0.86 boosted, 0.66 linear; all statistics 0.91 and 0.85).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.base import ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from covidcxr.evaluation.bootstrap import bootstrap_aucs, percentile_interval
from covidcxr.evaluation.diagnose.crossval import MIN_PER_CLASS, SMALL_SAMPLE, oof_proba, small_sample_classifier
from covidcxr.lungs.boxes import content_box

HIST_BINS = 16
FEATURE_GROUPS = {
    "size and aspect": ["orig_height", "orig_width", "aspect", "log_pixels"],
    "padding and border": ["padding_fraction", "dark_fraction", "bright_fraction", "border_mean", "border_std"],
    "intensity histogram": [f"hist_{i:02d}" for i in range(HIST_BINS)] + ["mean", "std"],
    "sharpness and noise": ["laplacian_var", "high_freq_energy", "noise_mad"],
}


def image_features(images: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
    """Non-anatomical features per image: size before resizing, padding/border, histogram, sharpness/noise."""
    h, w = rows["orig_height"].to_numpy(float), rows["orig_width"].to_numpy(float)
    table = pd.DataFrame({"orig_height": h, "orig_width": w, "aspect": h / w, "log_pixels": np.log(h * w)})
    per_image = pd.DataFrame([_pixel_features(img) for img in images])
    return pd.concat([table, per_image], axis=1)


def _pixel_features(image: np.ndarray) -> dict[str, float]:
    top, bottom, left, right = content_box(image)
    content = image[top:bottom, left:right].astype(np.float32)
    ring = max(1, round(0.05 * min(content.shape)))
    border = np.concatenate([content[:ring].ravel(), content[-ring:].ravel(), content[:, :ring].ravel(),
                             content[:, -ring:].ravel()])
    hist = np.histogram(content, bins=HIST_BINS, range=(0, 256))[0] / content.size
    centre = _centre_crop(content)
    lap = ndimage.laplace(centre)
    return {"padding_fraction": 1 - content.size / image.size, "dark_fraction": float((content <= 8).mean()),
            "bright_fraction": float((content >= 247).mean()), "border_mean": float(border.mean()),
            "border_std": float(border.std()), **{f"hist_{i:02d}": float(v) for i, v in enumerate(hist)},
            "mean": float(content.mean()), "std": float(content.std()), "laplacian_var": float(lap.var()),
            "high_freq_energy": _high_freq_energy(centre), "noise_mad": float(np.median(np.abs(lap)))}


def _centre_crop(content: np.ndarray) -> np.ndarray:
    """The central half of the content (inside the body for nearly every film): where sharpness is measured."""
    h, w = content.shape
    return content[h // 4: h - h // 4, w // 4: w - w // 4]


def _high_freq_energy(patch: np.ndarray) -> float:
    """Share of spectral energy (DC left out) above half the Nyquist frequency."""
    spectrum = np.abs(np.fft.rfft2(patch - patch.mean())) ** 2
    fy = np.fft.fftfreq(patch.shape[0])[:, None]
    fx = np.fft.rfftfreq(patch.shape[1])[None, :]
    high = np.hypot(fy, fx) > 0.25
    return float(spectrum[high].sum() / max(spectrum.sum(), 1e-12))


def image_stats_check(features: pd.DataFrame, y: np.ndarray, groups: np.ndarray, seed: int = 0,
                      n_boot: int = 1000) -> dict[str, Any]:
    """Per feature group and for all groups together: the cross-validated (by patient) AUC with its 95 % patient-
    bootstrap interval, and the balanced accuracy. Per feature: the in-sample AUC of the raw value, direction-free
    (descriptive only: the best of many features looks good by chance at small sizes).
    Fewer than MIN_PER_CLASS images of a class: no groups, and a note that says so."""
    smallest = int(np.bincount(y, minlength=2).min())
    if smallest < MIN_PER_CLASS:
        return {"note": f"inconclusive (too few images): {smallest} of one class, at least {MIN_PER_CLASS} needed",
                "groups": {}, "features": {}}
    sets = {**FEATURE_GROUPS, "all": list(features.columns)}
    clf = _classifier(len(y), seed)
    proba = {name: oof_proba(features[cols].to_numpy(), y, groups, seed, clf)[:, 1] for name, cols in sets.items()}
    reps = bootstrap_aucs(y, list(proba.values()), groups, n_boot, seed)
    out: dict[str, Any] = {"groups": {}, "features": {}}
    for (name, p), column in zip(proba.items(), reps.T):
        out["groups"][name] = {"auc": float(roc_auc_score(y, p)), "auc_ci95": list(percentile_interval(column)),
                               "balanced_accuracy": float(balanced_accuracy_score(y, p >= 0.5))}
    for col in features.columns:
        auc = roc_auc_score(y, features[col].to_numpy())
        out["features"][col] = float(max(auc, 1 - auc))
    return out


def _classifier(n: int, seed: int) -> ClassifierMixin:
    """Linear below SMALL_SAMPLE images (boosting cannot split there), boosted trees above."""
    if n < SMALL_SAMPLE:
        return small_sample_classifier()
    return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15,
                                          class_weight="balanced", random_state=seed)
