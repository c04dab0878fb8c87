"""metrics.json: the metrics of a set of predictions, overall and per source, each with its patient-level bootstrap
interval, with calibration, the threshold and where the predictions came from; written as strict JSON and read back
with a check, so every report and comparison reads the same structure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidcxr.errors import InputError
from covidcxr.evaluation.bootstrap import bootstrap_ci, patient_codes
from covidcxr.evaluation.metrics import METRIC_NAMES, binary_metrics, calibration, confusion_counts


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
