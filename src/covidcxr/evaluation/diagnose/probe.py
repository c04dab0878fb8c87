"""Shortcut probe: how well the image's source collection can be read off the model's penultimate features.

A model that learned the disease needs no knowledge of the hospital; features from which the collection is easy to
predict (far above chance), even among images of the same label, show that the acquisition is encoded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

from covidcxr.evaluation.bootstrap import patient_codes
from covidcxr.evaluation.diagnose.crossval import MIN_PER_CLASS, balanced_accuracy_ci, oof_proba
from covidcxr.formatting import number, value_ci


def _probe(features: np.ndarray, target: pd.Series, groups: pd.Series, seed: int) -> dict | None:
    """Cross-validated (by patient) balanced accuracy of a linear classifier with its 95 % patient-bootstrap
    interval, and chance level beside it. Sources with fewer than MIN_PER_CLASS images are left out; None when
    fewer than two remain."""
    counts = target.value_counts()
    keep = target.isin(counts[counts >= MIN_PER_CLASS].index).to_numpy()
    if target[keep].nunique() < 2:
        return None
    x, y, g = features[keep], target[keep].astype(str).to_numpy(), groups[keep].to_numpy()
    classes = np.unique(y)
    pred = classes[oof_proba(x, y, g, seed).argmax(axis=1)]
    return {"balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "balanced_accuracy_ci95": list(balanced_accuracy_ci(y, pred, g, seed=seed)), "chance": 1.0 / len(classes),
            "n": int(len(y)), "classes": classes.tolist()}


def source_probe(features: np.ndarray, rows: pd.DataFrame, seed: int = 0) -> dict:
    """Source predictability overall and within each label (where a label spans several sources)."""
    rows = rows.reset_index(drop=True).assign(patient=patient_codes(rows))  # an image without an id: its own patient
    result: dict[str, Any] = {"overall": _probe(features, rows["source"], rows["patient"], seed), "within_label": {}}
    for label, sub in rows.groupby("label"):
        probe = _probe(features[sub.index.to_numpy()], sub["source"], sub["patient"], seed)
        if probe:
            result["within_label"][label] = probe
    return result


def describe(probe: dict) -> str:
    """One plain sentence per probe result."""
    lines = []
    overall = probe.get("overall")
    if overall:
        lines.append(f"The source collection is predicted from the model's features with balanced accuracy "
                     f"{_with_ci(overall)} (chance {number(overall['chance'], 2)}, {len(overall['classes'])} sources).")
    for label, p in probe.get("within_label", {}).items():
        lines.append(f"Among {label} images alone: {_with_ci(p)} (chance {number(p['chance'], 2)}; "
                     f"sources {', '.join(p['classes'])}).")
    return " ".join(lines) or f"Too few sources to probe (each needs {MIN_PER_CLASS} images)."


def _with_ci(p: dict) -> str:
    """A probe's balanced accuracy with its interval."""
    return value_ci(p["balanced_accuracy"], p["balanced_accuracy_ci95"], 2)
