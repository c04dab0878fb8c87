"""Binary screening metrics of one set of predictions: the threshold metrics, AUC and PR-AUC, calibration, and the
same metrics under image weights, which is how the patient-level bootstrap (`covidcxr.evaluation.bootstrap`)
computes them for many resamples at once.

Everything here works on predictions only: `y` (1 = positive, 0 = negative) and `score` (the model's
positive-class probability); an image is called positive when `score >= threshold`.
Undefined values are NaN, never a made-up number; `covidcxr.evaluation.metrics_json` turns them into JSON `null` and
`covidcxr.formatting` shows them as "n/a". Sensitivity needs positives, specificity negatives; PPV, NPV, F1, balanced
accuracy, AUC and PR-AUC need both classes (with positives only, PPV and PR-AUC would be 1 whatever the model does).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    roc_auc_score,
)

from covidcxr.errors import InputError

METRIC_NAMES = (
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
    "auc",
    "pr_auc",
)


def as_arrays(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and scores once, so every metric can trust them."""
    y_arr = np.asarray(y)
    s_arr = np.asarray(score, dtype=float)
    if y_arr.ndim != 1 or y_arr.shape != s_arr.shape:
        raise ValueError(f"y and score must be 1-D of equal length, got shapes {y_arr.shape} and {s_arr.shape}")
    if y_arr.size == 0:
        raise InputError("no predictions to evaluate")
    if not np.isin(y_arr, (0, 1)).all():
        raise ValueError(f"y must be 0/1, got values {sorted(set(y_arr.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s_arr).all():
        raise ValueError(f"score has {int((~np.isfinite(s_arr)).sum())} non-finite values")
    return y_arr.astype(np.int64), s_arr


Counts = int | float | np.ndarray  # confusion counts: plain, bootstrap-weighted, or one per resample


def _safe_div(num: Counts, den: Counts) -> np.ndarray:
    """num / den with NaN where den == 0 (an undefined rate, not zero)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _rates(tp: Counts, fp: Counts, tn: Counts, fn: Counts) -> dict[str, np.ndarray]:
    """Threshold metrics from (possibly weighted, possibly vectorised) confusion counts."""
    sensitivity = _safe_div(tp, tp + fn)
    specificity = _safe_div(tn, tn + fp)
    both = (np.asarray(tp + fn) > 0) & (np.asarray(tn + fp) > 0)

    def two_class(rate: np.ndarray) -> np.ndarray:
        return np.where(both, rate, np.nan)

    return {
        "accuracy": _safe_div(tp + tn, tp + fp + tn + fn),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": two_class(_safe_div(tp, tp + fp)),
        "npv": two_class(_safe_div(tn, tn + fn)),
        "f1": two_class(_safe_div(2 * tp, 2 * tp + fp + fn)),
        "balanced_accuracy": (sensitivity + specificity) / 2,  # NaN when either class is absent
    }


def confusion_counts(y: Any, score: Any, threshold: float) -> dict[str, int]:
    """tp, fp, tn, fn at `threshold` (positive when score >= threshold)."""
    y_arr, s_arr = as_arrays(y, score)
    tn, fp, fn, tp = confusion_matrix(y_arr, (s_arr >= threshold).astype(int), labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def binary_metrics(y: Any, score: Any, threshold: float) -> dict[str, float]:
    """All of METRIC_NAMES as floats; NaN where a metric is undefined for these predictions."""
    y_arr, s_arr = as_arrays(y, score)
    c = confusion_counts(y_arr, s_arr, threshold)
    out = {k: float(v) for k, v in _rates(c["tp"], c["fp"], c["tn"], c["fn"]).items()}
    has_pos, has_neg = bool(y_arr.any()), bool((1 - y_arr).any())
    out["auc"] = float(roc_auc_score(y_arr, s_arr)) if has_pos and has_neg else math.nan
    out["pr_auc"] = float(average_precision_score(y_arr, s_arr)) if has_pos and has_neg else math.nan
    return out


def weighted_metrics(y: np.ndarray, score: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics for each row of image weights `w` (B, n) at once: the bootstrap's inner loop."""
    pos, called = y.astype(bool), score >= threshold
    tp, fp = w @ (pos & called), w @ (~pos & called)
    fn, tn = w @ (pos & ~called), w @ (~pos & ~called)
    return {**_rates(tp, fp, tn, fn), **weighted_rank_metrics(pos, score, w)}


def weighted_rank_metrics(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """AUC and average precision for each row of image weights `w` (B, n); NaN where a class has no weight.

    Both come from per-score-level weighted counts (ties count one half in AUC), the same definitions as
    scikit-learn's with sample_weight.
    """
    order = np.argsort(-score, kind="stable")
    s_sorted = score[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # one group per distinct score
    w_sorted = w[:, order]
    pos_sorted = pos[order]
    p_level = np.add.reduceat(w_sorted * pos_sorted, starts, axis=1)  # (B, levels), descending score
    n_level = np.add.reduceat(w_sorted * ~pos_sorted, starts, axis=1)
    cum_p, cum_n = np.cumsum(p_level, axis=1), np.cumsum(n_level, axis=1)
    tot_p, tot_n = cum_p[:, -1], cum_n[:, -1]
    below = tot_n[:, None] - cum_n  # negative weight strictly below each level
    precision = _safe_div(cum_p, cum_p + cum_n)
    average_precision = _safe_div(np.where(p_level > 0, p_level * precision, 0.0).sum(axis=1), tot_p)
    return {"auc": _safe_div((p_level * (below + 0.5 * n_level)).sum(axis=1), tot_p * tot_n),
            "pr_auc": np.where(tot_n > 0, average_precision, np.nan)}


def calibration(y: Any, score: Any, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-width score bins, Brier score, and the bins for a reliability plot.

    Bin i holds scores in [i/n_bins, (i+1)/n_bins) (the last bin includes 1.0); ECE weights each bin's
    |fraction positive - mean score| by its share of images.
    """
    y_arr, s_arr = as_arrays(y, score)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    idx = np.clip((s_arr * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_score = np.bincount(idx, weights=s_arr, minlength=n_bins)
    sum_pos = np.bincount(idx, weights=y_arr, minlength=n_bins)
    mean_score, frac_pos = _safe_div(sum_score, count), _safe_div(sum_pos, count)
    bins = [
        {
            "lo": i / n_bins,
            "hi": (i + 1) / n_bins,
            "count": int(count[i]),
            "mean_score": float(mean_score[i]),
            "frac_positive": float(frac_pos[i]),
        }
        for i in range(n_bins)
    ]
    return {
        "ece": float(np.abs(sum_pos - sum_score).sum() / y_arr.size),
        "brier": float(brier_score_loss(y_arr, s_arr, pos_label=1)),
        "bins": bins,
    }
