"""Cross-validation sized for the evaluation, from about 30 images up, shared by the image-statistics check and the
source probe.

At tens of images the classifier must be small: gradient boosting with its default minimum leaf size cannot split
at all and returns a constant (AUC exactly 0.500), and a weakly regularised model memorises. `small_sample_classifier`
(strongly regularised logistic regression on standardised inputs) fits that size. The split is stratified k-fold by
patient; below SMALL_SAMPLE images it is repeated with different shuffles and the out-of-fold probabilities
averaged, so the result does not hinge on one lucky or unlucky split (at hundreds of images one split is stable).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from covidcxr.evaluation.bootstrap import patient_bootstrap_weights, percentile_interval

MIN_PER_CLASS = 5  # fewer images of a class than this: too few to cross-validate (the check is inconclusive)
SMALL_SAMPLE = 200  # below this many images: repeated splits (and, for the image statistics, a linear model)
REPEATS = 5  # shuffled k-fold splits averaged below SMALL_SAMPLE
FOLDS = 5
C = 0.1  # L2 strength of the logistic regression (small: strong shrinkage, for tens of images and tens of inputs)


def small_sample_classifier() -> Pipeline:
    """Standardise, then balanced L2 logistic regression: capacity that fits a few tens of images."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=2000))


def oof_proba(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0,
              classifier: ClassifierMixin | None = None) -> np.ndarray:
    """(N, classes) out-of-fold probabilities of `classifier` (default small_sample_classifier) from stratified
    splits by patient, averaged over REPEATS shuffles below SMALL_SAMPLE images: every image is scored by models
    that never saw its patient. Needs MIN_PER_CLASS images of each class."""
    folds = min(FOLDS, int(np.unique(y, return_counts=True)[1].min()))
    repeats = REPEATS if len(y) < SMALL_SAMPLE else 1
    clf = classifier if classifier is not None else small_sample_classifier()
    total = sum(cross_val_predict(clf, x, y, groups=groups, method="predict_proba",
                                  cv=StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r))
                for r in range(repeats))
    return total / repeats


def balanced_accuracy_ci(y: np.ndarray, pred: np.ndarray, codes: np.ndarray, n_boot: int = 1000,
                         seed: int = 0) -> tuple[float, float]:
    """95 % patient-bootstrap interval of the balanced accuracy (mean per-class recall) of fixed predictions."""
    classes = np.unique(y)
    member = np.stack([y == c for c in classes], axis=1).astype(float)  # (N, k)
    hit = member * (pred == y)[:, None]
    reps = [np.mean((w @ hit) / np.where(w @ member > 0, w @ member, np.nan), axis=1)
            for w in patient_bootstrap_weights(codes, n_boot, seed)]
    return percentile_interval(np.concatenate(reps))
