"""Triage with a finite-sample guarantee: a rule-out and a rule-in threshold set on a site's labelled images.

Rule-out (score <= t_out) promises NPV >= `npv`, rule-in (score >= t_in) promises PPV >= `ppv`, each with probability
at least `confidence` over the draw of the calibration images; every other image needs a reader.

The promise is about the rate a site will count, not only the long-run rate: for a threshold whose class took k of the
calibration images, it covers the realised NPV (PPV) of the next k images the class takes. A site counts a finite
batch, and a threshold that only just keeps the long-run rate misses it on about half of the batches: on the
cross-source folds the long-run test's realised rates fell below the promise in 14.7 % of the held-back cases
(benchmarks/bench_triage.py).

The method is Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021) with fixed-sequence testing: the
candidate thresholds are the calibration scores, ordered from the most cautious (fewest images ruled out or in) to the
boldest. Each is tested by an exact p-value for "the next k images of its class hold fewer correct than the promise":
the calibration's k and the next k images are exchangeable, so given the correct images among all 2k the calibration's
count is hypergeometric, and the largest count still under the promise gives the p-value (a two-sample exact test).
The sequence stops at the first candidate that fails, so the chosen threshold's promise holds with probability >=
confidence without a multiplicity correction. Candidates leaving fewer images in the class than could ever pass are left
out of the sequence (that depends on the scores only, never on the labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, hypergeom

from covidcxr.errors import InputError
from covidcxr.model.spec import READER, RULE_IN, RULE_OUT, triage_classes

METHOD = ("Learn-then-Test with fixed-sequence testing of exact two-sample (hypergeometric) p-values for the realised "
          "rate of the next batch of the class as large as its calibration images, candidates from the most cautious "
          "threshold on")


class TooFewForTriage(InputError):
    """The labelled images cannot prove the promises; `reason` says how many each class needs (the message is the
    data set's name, then the reason)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class TriageTargets:
    npv: float = 0.95  # promised NPV of rule-out
    ppv: float = 0.90  # promised PPV of rule-in
    confidence: float = 0.9  # probability that each promise holds, over the draw of the calibration images


def p_values(correct_in_order: np.ndarray, target: float) -> np.ndarray:
    """For k = 1, 2, ...: the exact p-value of "the next k images of the class hold fewer than target * k correct",
    given how many of the first k calibration images (ordered from the safest) are correct. Of the 2k exchangeable
    images the calibration's correct count is hypergeometric; the null's largest pool of correct images (the
    calibration's plus target * k - 1 from the batch, rounded up) makes the largest p-value."""
    k = np.arange(1, len(correct_in_order) + 1)
    correct = np.cumsum(correct_in_order)
    below_target = np.ceil(np.round(target * k, 9)).astype(int) - 1  # the most correct a batch of k may hold and miss
    return hypergeom.sf(correct - 1, 2 * k, correct + below_target, k)


def needed(target: float, confidence: float) -> int:
    """The fewest images a class must hold for its promise to be provable at all: the first k whose p-value, with all
    k calibration images correct, is at most 1 - confidence."""
    size = 64
    while not (passing := np.flatnonzero(p_values(np.ones(size, bool), target) <= 1 - confidence)).size:
        size *= 2  # target < 1 passes at some k: the all-correct p-value falls towards 0 as k grows
    return int(passing[0]) + 1


def enough(y: np.ndarray, targets: TriageTargets) -> bool:
    """Whether these labelled images hold as many of each class as the promises need to be provable at all."""
    return (int((y == 0).sum()) >= needed(targets.npv, targets.confidence)
            and int((y == 1).sum()) >= needed(targets.ppv, targets.confidence))


def check_enough(y: np.ndarray, targets: TriageTargets, name: str) -> None:
    """One-line refusal when the labelled images cannot prove either promise, with the numbers needed."""
    neg_need, pos_need = needed(targets.npv, targets.confidence), needed(targets.ppv, targets.confidence)
    n_neg, n_pos = int((y == 0).sum()), int((y == 1).sum())
    if not enough(y, targets):
        raise TooFewForTriage(name, f"too few labelled images for triage: NPV >= {targets.npv} and PPV >= "
                              f"{targets.ppv} with confidence {targets.confidence} need at least {neg_need} negative "
                              f"and {pos_need} positive calibration images (there are {n_neg} and {n_pos}); label "
                              "more of the site's images or raise --fraction")


def _fixed_sequence(correct_in_order: np.ndarray, target: float, alpha: float) -> int:
    """How many of the images (ordered from the safest) the class may take: the largest k of the fixed sequence
    k = n_min, n_min + 1, ... whose p-value is at most alpha, stopping at the first that is not; 0 when the first
    already fails."""
    n_min = needed(target, 1 - alpha)
    if len(correct_in_order) < n_min:
        return 0
    p = p_values(correct_in_order, target)[n_min - 1:]
    failed = np.flatnonzero(p > alpha)
    stop = failed[0] if failed.size else len(p)  # the sequence ends at its first failure
    return n_min + int(stop) - 1 if stop else 0


def _tie_safe(scores_sorted: np.ndarray, k: int, n_min: int) -> int:
    """k moved back so that the cut does not split tied scores (a threshold takes all images of a score or none);
    0 when that leaves fewer than the n_min images the sequence starts at (those were never tested)."""
    while 0 < k < len(scores_sorted) and scores_sorted[k - 1] == scores_sorted[k]:
        k -= 1
    return k if k >= n_min else 0


def fit_triage(y: np.ndarray, scores: np.ndarray, targets: TriageTargets) -> dict:
    """Thresholds from labelled calibration scores; a class no candidate can prove is empty (its bound is null).
    Should the two cuts overlap (lenient promises), rule-in keeps the overlap and rule-out stops below it."""
    y, scores = np.asarray(y, int), np.asarray(scores, float)
    alpha = 1 - targets.confidence
    down = np.argsort(-scores, kind="stable")  # rule-in: from the highest score down
    k_in = _tie_safe(scores[down], _fixed_sequence(y[down] == 1, targets.ppv, alpha),
                     needed(targets.ppv, targets.confidence))
    rule_in_min = float(scores[down][k_in - 1]) if k_in else None
    up = np.argsort(scores, kind="stable")  # rule-out: from the lowest score up (tested apart from rule-in)
    k_out = _fixed_sequence(y[up] == 0, targets.npv, alpha)
    if rule_in_min is not None:  # an overlap goes to rule-in: rule-out keeps an earlier, also tested, cut below it
        k_out = min(k_out, int((scores < rule_in_min).sum()))
    k_out = _tie_safe(scores[up], k_out, needed(targets.npv, targets.confidence))
    rule_out_max = float(scores[up][k_out - 1]) if k_out else None
    return {"rule_out_max": rule_out_max, "rule_in_min": rule_in_min, "npv": targets.npv, "ppv": targets.ppv,
            "confidence": targets.confidence, "method": METHOD, "n_calibration": int(len(y)),
            "n_rule_out": int(k_out), "n_rule_in": int(k_in)}


def triage_summary(y: np.ndarray, scores: np.ndarray, triage: dict) -> dict:
    """Each class's share and the realised NPV (rule-out) and PPV (rule-in) with exact 95 % intervals."""
    y, classes = np.asarray(y, int), triage_classes(np.asarray(scores, float), triage)
    out: dict = {"n": int(len(y))}
    for name, correct_label, promise in ((RULE_OUT, 0, "npv"), (RULE_IN, 1, "ppv"), (READER, None, None)):
        inside = classes == name
        entry: dict = {"n": int(inside.sum()), "share": float(inside.mean()) if len(y) else None}
        if promise is not None:
            k, n = int((y[inside] == correct_label).sum()), int(inside.sum())
            ci = binomtest(k, n).proportion_ci(0.95, "exact") if n else None
            entry.update({promise: k / n if n else None, f"{promise}_ci95": [ci.low, ci.high] if ci else None,
                          "promised": triage[promise], "met": (k / n >= triage[promise]) if n else None})
        out[name] = entry
    return out
