"""Binary screening metrics with patient-level bootstrap intervals, threshold choice and calibration.

Everything here works on predictions only: `y` (1 = positive, 0 = negative) and `score` (the model's
positive-class probability); an image is called positive when `score >= threshold`.
Undefined values are NaN, never a made-up number; `evaluate_predictions` and `write_metrics` turn them into JSON
`null` and `covidcxr.formatting` shows them as "n/a". Sensitivity needs positives, specificity negatives; PPV, NPV,
F1, balanced accuracy, AUC and PR-AUC need both classes (with positives only, PPV and PR-AUC would be 1 whatever the
model does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
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
_BOOT_CHUNK = 128  # bootstrap replicates computed together: bounds memory at ~chunk x n floats per array


def _as_arrays(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
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


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where den == 0 (an undefined rate, not zero)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _rates(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
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
    y_arr, s_arr = _as_arrays(y, score)
    tn, fp, fn, tp = confusion_matrix(y_arr, (s_arr >= threshold).astype(int), labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def binary_metrics(y: Any, score: Any, threshold: float) -> dict[str, float]:
    """All of METRIC_NAMES as floats; NaN where a metric is undefined for these predictions."""
    y_arr, s_arr = _as_arrays(y, score)
    c = confusion_counts(y_arr, s_arr, threshold)
    out = {k: float(v) for k, v in _rates(c["tp"], c["fp"], c["tn"], c["fn"]).items()}
    has_pos, has_neg = bool(y_arr.any()), bool((1 - y_arr).any())
    out["auc"] = float(roc_auc_score(y_arr, s_arr)) if has_pos and has_neg else math.nan
    out["pr_auc"] = float(average_precision_score(y_arr, s_arr)) if has_pos and has_neg else math.nan
    return out


def _weighted_metrics(y: np.ndarray, score: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """All metrics for each row of image weights `w` (B, n) at once: the bootstrap's inner loop."""
    pos, called = y.astype(bool), score >= threshold
    tp, fp = w @ (pos & called), w @ (~pos & called)
    fn, tn = w @ (pos & ~called), w @ (~pos & ~called)
    return {**_rates(tp, fp, tn, fn), **_rank_metrics(pos, score, w)}


def _rank_metrics(pos: np.ndarray, score: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
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


def patient_codes(pred_df: pd.DataFrame) -> np.ndarray:
    """One integer per patient; ids are scoped by source, and an image without a patient id is its own patient."""
    pid = pred_df["patient_id"].astype("string").fillna("").str.strip()
    key = pid.where(pid != "", "image:" + pred_df["path"].astype(str))
    if "source" in pred_df.columns:
        key = pred_df["source"].astype(str) + "\x1f" + key
    codes, _ = pd.factorize(key, sort=False)
    return codes


def bootstrap_ci(
    pred_df: pd.DataFrame, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals from resampling PATIENTS with replacement (all their images come along).

    Images of one patient are correlated, so resampling images would give intervals that are too narrow.
    Replicates where a metric is undefined (e.g. no positive patient drawn) are left out of its interval.
    """
    y, score = _as_arrays(pred_df["y"].to_numpy(), pred_df["score"].to_numpy())
    reps: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for w in patient_bootstrap_weights(patient_codes(pred_df), n_boot, seed):
        for name, values in _weighted_metrics(y, score, threshold, w).items():
            reps[name].append(values)
    return {name: percentile_interval(np.concatenate(chunks)) for name, chunks in reps.items()}


def patient_bootstrap_weights(codes: np.ndarray, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Bootstrap replicates as image weights, in chunks of shape (b, n_images): how often each image's patient
    (`codes`: one value per image, e.g. from patient_codes) was drawn when resampling patients with replacement."""
    if n_boot < 1:
        raise InputError(f"n_boot must be at least 1, got {n_boot}")
    codes, _ = pd.factorize(np.asarray(codes))  # contiguous 0..k-1; patient_codes output passes unchanged
    n_pat = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _BOOT_CHUNK):
        b = min(_BOOT_CHUNK, n_boot - start)
        draws = rng.integers(0, n_pat, size=(b, n_pat))
        flat = (np.arange(b)[:, None] * n_pat + draws).ravel()
        yield np.bincount(flat, minlength=b * n_pat).reshape(b, n_pat).astype(float)[:, codes]


def bootstrap_aucs(y: Any, scores: Sequence[Any], codes: np.ndarray, n_boot: int = 1000,
                   seed: int = 0) -> np.ndarray:
    """(n_boot, len(scores)) AUCs of several scores of the same images on the same patient resamples (NaN where a
    resample holds one class). The replicates are paired, so a difference between two scores gets an interval
    that accounts for their correlation (two separate intervals overlap far more than the difference varies)."""
    arrays = [_as_arrays(y, s) for s in scores]
    pos = arrays[0][0].astype(bool)
    chunks = [np.stack([_rank_metrics(pos, s, w)["auc"] for _, s in arrays], axis=1)
              for w in patient_bootstrap_weights(codes, n_boot, seed)]
    return np.concatenate(chunks)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of bootstrap replicates, undefined (NaN) ones left out."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return (float(lo), float(hi))


def calibration(y: Any, score: Any, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-width score bins, Brier score, and the bins for a reliability plot.

    Bin i holds scores in [i/n_bins, (i+1)/n_bins) (the last bin includes 1.0); ECE weights each bin's
    |fraction positive - mean score| by its share of images.
    """
    y_arr, s_arr = _as_arrays(y, score)
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


def _summary(pred_df: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Metrics with intervals, confusion counts and sizes for one set of predictions."""
    y, score = pred_df["y"].to_numpy(), pred_df["score"].to_numpy()
    values = binary_metrics(y, score, threshold)
    ci = bootstrap_ci(pred_df, threshold, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {name: {"value": values[name], "ci95": list(ci[name])} for name in METRIC_NAMES}
    out["confusion"] = confusion_counts(y, score, threshold)
    out["n"] = int(len(pred_df))
    out["n_patients"] = int(patient_codes(pred_df).max()) + 1
    note = _one_class_note(pred_df["y"].to_numpy())
    if note:
        out["note"] = note
    return out


def _one_class_note(y: np.ndarray) -> str | None:
    """Why most metrics are undefined on one class, or None when both are present."""
    undefined = "PPV, NPV, F1, balanced accuracy, AUC and PR-AUC are undefined (they need both classes)"
    if y.all():
        return f"positives only: sensitivity is the meaningful rate; specificity, {undefined}"
    if not y.any():
        return f"negatives only: specificity is the meaningful rate; sensitivity, {undefined}"
    return None


def _positive_label(pred_df: pd.DataFrame) -> str:
    """The label of the positives, when the caller did not say it and the predictions tell it unambiguously."""
    labels = sorted(pred_df.loc[pred_df["y"] == 1, "label"].astype(str).unique())
    if len(labels) != 1:
        raise ValueError(f"cannot tell the positive label from the predictions (y == 1 labels: {labels}); pass it")
    return labels[0]


def evaluate_predictions(
    pred_df: pd.DataFrame,
    threshold: float,
    threshold_method: str,
    n_boot: int = 1000,
    seed: int = 0,
    provenance: Mapping[str, Any] | None = None,
    positive_label: str | None = None,
) -> dict[str, Any]:
    """The full metrics.json structure (DESIGN.md), JSON-ready: undefined numbers are None.

    Overall and per source: each metric as {"value", "ci95"}, `confusion`, `n`, `n_patients`, and a `note`
    when only one class is present.
    `positive_label` defaults to the one label of the rows with y == 1 (pass it when there are none).
    """
    missing = {"path", "source", "patient_id", "label", "y", "score"} - set(pred_df.columns)
    if missing:
        raise InputError(f"predictions lack columns {sorted(missing)}")
    metrics = _summary(pred_df, threshold, n_boot, seed)
    per_source: dict[str, Any] = {}
    for source, sub in pred_df.groupby(pred_df["source"].astype(str), sort=True):
        per_source[source] = _summary(sub, threshold, n_boot, seed)
    cal = calibration(pred_df["y"].to_numpy(), pred_df["score"].to_numpy())
    metrics.update(
        threshold=float(threshold),
        threshold_method=threshold_method,
        per_source=per_source,
        calibration=cal,
        positive_label=positive_label if positive_label is not None else _positive_label(pred_df),
        provenance=dict(provenance or {}),
    )
    return _json_ready(metrics)


def _json_ready(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write metrics as strict JSON (NaN becomes null, so any JSON reader can load it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_ready(metrics), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Load a metrics.json written by write_metrics; one clear error naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read metrics ({err})") from None
    missing = [k for k in (*METRIC_NAMES, "threshold", "confusion", "n") if k not in data]
    if missing:
        raise InputError(f"{path}: not a covidcxr metrics.json (missing {', '.join(missing)})")
    return data
