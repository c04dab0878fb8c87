"""Shortcut probe: how well the image's source collection can be read off the model's penultimate features.

A model that learned the disease needs no knowledge of the hospital; features from which the collection is easy to
predict (far above chance), even among images of the same label, show that the acquisition is encoded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler



def _probe(features: np.ndarray, target: pd.Series, groups: pd.Series, seed: int) -> dict | None:
    """Cross-validated (by patient) balanced accuracy of a linear classifier, with chance level beside it."""
    counts = target.value_counts()
    keep = target.isin(counts[counts >= 5].index).to_numpy()
    if target[keep].nunique() < 2:
        return None
    x, y, g = features[keep], target[keep].to_numpy(), groups[keep].to_numpy()
    folds = min(5, int(pd.Series(y).value_counts().min()))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, class_weight="balanced"))
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(clf, x, y, groups=g, cv=cv)
    k = len(np.unique(y))
    return {"balanced_accuracy": float(balanced_accuracy_score(y, pred)), "chance": 1.0 / k, "n": int(len(y)),
            "classes": sorted(map(str, np.unique(y)))}


def source_probe(features: np.ndarray, rows: pd.DataFrame, seed: int = 0) -> dict:
    """Source predictability overall and within each label (where a label spans several sources)."""
    result = {"overall": _probe(features, rows["source"].reset_index(drop=True),
                                rows["patient_id"].reset_index(drop=True), seed), "within_label": {}}
    for label, sub in rows.reset_index(drop=True).groupby("label"):
        probe = _probe(features[sub.index.to_numpy()], sub["source"], sub["patient_id"], seed)
        if probe:
            result["within_label"][label] = probe
    return result


def describe(probe: dict) -> str:
    """One plain sentence per probe result."""
    lines = []
    overall = probe.get("overall")
    if overall:
        lines.append(f"The source collection is predicted from the model's features with balanced accuracy "
                     f"{overall['balanced_accuracy']:.2f} (chance {overall['chance']:.2f}, {len(overall['classes'])} sources).")
    for label, p in probe.get("within_label", {}).items():
        lines.append(f"Among {label} images alone: {p['balanced_accuracy']:.2f} (chance {p['chance']:.2f}; "
                     f"sources {', '.join(p['classes'])}).")
    return " ".join(lines) or "Too few sources to probe."
