"""The shift alarm: does a batch of scores look like the validation split's, or is the model out of its depth?

Two stated tests against the validation scores (RUN/val_predictions.csv): a two-sample Kolmogorov-Smirnov test on
the score distributions, and Fisher's exact test on the predicted-positive rate (2x2: called positive or not, batch
or validation). Two tests are run, so each p-value is compared with alpha / 2 (Bonferroni). A tiny p-value alone
is not enough on large batches, so an alarm also needs an effect of at least MIN_SHIFT, one floor in one unit for
both tests: the rate gap is the gap between the two score distributions (as shares of images called positive) at
the run's threshold, and the KS distance is the largest such gap at any threshold. Measured under the cross-source
protocol (docs/results/reproduce/trust.md), the run's own test split stays below it (KS 0.11) and every held-out
collection reaches it (KS 0.15-0.50). A different prevalence of disease at a site also moves the rate: the alarm
says "look", not "wrong".
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact, ks_2samp

from covidcxr.errors import InputError

ALPHA = 0.01  # family-wise, over the two tests
MIN_SHIFT = 0.15  # the rate gap, or the KS distance, must be at least 15 points of share of images
MIN_IMAGES = 15  # fewer images than this (here or on validation): no verdict; Fisher's test is exact at any n
TESTS = "two-sample Kolmogorov-Smirnov on scores; Fisher's exact test on the predicted-positive rate"


def reference_scores(run_dir: str | Path) -> np.ndarray:
    """The run's validation scores, the reference every batch is compared with."""
    path = Path(run_dir) / "val_predictions.csv"
    if not path.is_file():
        raise InputError(f"{path}: missing; the shift alarm needs the run's validation scores "
                         "(covidcxr train writes them)")
    return pd.read_csv(path)["score"].to_numpy(dtype=float)


def shift_test(reference: np.ndarray, scores: np.ndarray, threshold: float, positive_label: str = "positive",
               alpha: float = ALPHA) -> dict:
    """Compare a batch's scores with the reference; returns the tests, rates, p-values and a plain-words verdict."""
    reference, scores = np.asarray(reference, float), np.asarray(scores, float)
    n, n_ref = len(scores), len(reference)
    out = {"test": TESTS, "alpha": alpha, "multiple_testing": "Bonferroni over 2 tests (each p compared with alpha/2)",
           "min_shift": MIN_SHIFT, "n": n, "n_reference": n_ref, "alarm": False}
    if n < MIN_IMAGES or n_ref < MIN_IMAGES:
        return {**out, "message": f"no verdict: {n} image(s) here, {n_ref} on validation (need {MIN_IMAGES} each)"}
    pos, ref_pos = int((scores >= threshold).sum()), int((reference >= threshold).sum())
    rate, ref_rate = pos / n, ref_pos / n_ref
    p_rate = float(fisher_exact([[pos, n - pos], [ref_pos, n_ref - ref_pos]]).pvalue)
    ks = ks_2samp(scores, reference)
    rate_alarm = p_rate < alpha / 2 and abs(rate - ref_rate) >= MIN_SHIFT
    ks_alarm = float(ks.pvalue) < alpha / 2 and float(ks.statistic) >= MIN_SHIFT
    here = f"{rate:.0%} called {positive_label} here vs {ref_rate:.0%} on validation"
    if rate_alarm or ks_alarm:
        why = here if rate_alarm else f"the scores are distributed unlike validation's (KS distance {ks.statistic:.2f})"
        message = f"{why}: the model is probably not valid for these images"
    else:
        message = f"no shift detected ({here}; KS distance {ks.statistic:.2f})"
    return {**out, "alarm": bool(rate_alarm or ks_alarm), "positive_rate": rate, "reference_positive_rate": ref_rate,
            "p_rate": p_rate, "ks_statistic": float(ks.statistic), "p_ks": float(ks.pvalue), "message": message}


class ShiftMonitor:
    """The alarm over a rolling window of the latest `window` scores (for a service or a PACS watcher)."""

    def __init__(self, reference_scores: np.ndarray, threshold: float, window: int = 200,
                 positive_label: str = "positive"):
        self.reference = np.asarray(reference_scores, float)
        self.threshold, self.positive_label = threshold, positive_label
        self.scores: deque[float] = deque(maxlen=window)

    def add(self, scores) -> None:
        """Append newly scored images (one score or many)."""
        self.scores.extend(np.atleast_1d(np.asarray(scores, float)).tolist())

    def status(self) -> dict:
        """`shift_test` on the window: alarm, rates, p-values, message."""
        return {**shift_test(self.reference, np.array(self.scores), self.threshold, self.positive_label),
                "window": self.scores.maxlen}
