"""Patient-level bootstrap: 95 % intervals from resampling patients, not images.

Images of one patient are correlated (and some patients have many), so resampling images would give intervals that
are too narrow. A resample is a row of image weights (how often each image's patient was drawn), and the metrics of
many resamples are computed at once from `covidcxr.evaluation.metrics`' weighted forms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import InputError
from covidcxr.evaluation.metrics import METRIC_NAMES, as_arrays, weighted_metrics, weighted_rank_metrics

_BOOT_CHUNK = 128  # bootstrap replicates computed together: bounds memory at ~chunk x n floats per array


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
    y, score = as_arrays(pred_df["y"].to_numpy(), pred_df["score"].to_numpy())
    reps: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for w in patient_bootstrap_weights(patient_codes(pred_df), n_boot, seed):
        for name, values in weighted_metrics(y, score, threshold, w).items():
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
    arrays = [as_arrays(y, s) for s in scores]
    pos = arrays[0][0].astype(bool)
    chunks = [np.stack([weighted_rank_metrics(pos, s, w)["auc"] for _, s in arrays], axis=1)
              for w in patient_bootstrap_weights(codes, n_boot, seed)]
    return np.concatenate(chunks)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % percentile interval of bootstrap replicates, undefined (NaN) ones left out."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return (float(lo), float(hi))
