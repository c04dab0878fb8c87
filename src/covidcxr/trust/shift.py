"""The shift alarm: does a batch of scores look like the validation split's, or is the model out of its depth?

Two stated tests against the validation scores (RUN/val_predictions.csv): a two-sample Kolmogorov-Smirnov test on
the score distributions, and Fisher's exact test on the predicted-positive rate (2x2: called positive or not, batch
or validation). Two tests are run, so each p-value is compared with alpha / 2 (Bonferroni). A tiny p-value alone
is not enough on large batches, so an alarm also needs an effect of at least MIN_SHIFT, one floor in one unit for
both tests: the rate gap is the gap between the two score distributions (as shares of images called positive) at
the run's threshold, and the KS distance is the largest such gap at any threshold. A different prevalence of disease
at a site also moves the rate: the alarm says "look", not "wrong".

A stream (the service, a PACS watcher, `monitor`) is cut into consecutive batches of n predictions that do not
overlap, and each batch is tested once, when it is full. Re-testing a sliding window after every prediction is
hundreds of looks at nearly the same data, and false alarms pile up. The false-alarm rate is stated over a horizon:
a batch of n is tested at alpha(n) = STREAM_ALPHA / ceil(HORIZON / n), so the chance of any false alarm in HORIZON
predictions like the validation split's is at most STREAM_ALPHA (Bonferroni over the batches that fit in it), and
so is the false-alarm rate of any single batch, at every n. One-off batches (a report, a validation) use the same
alpha(n). That rate holds on average over validation splits: against one fixed split of a few hundred images, whose
own scores stray from the model's true distribution by chance, it can be higher or lower. `alarm_power` measures
what the alarm does against a run's actual reference: the false-alarm rate on batches of the run's own test split and
the detection rate on collections it never saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact, ks_2samp, norm

from covidcxr.errors import InputError
from covidcxr.formatting import markdown_table, value_ci

STREAM_ALPHA = 0.05  # chance of a false alarm over HORIZON predictions like the validation split's
HORIZON = 300  # predictions over which STREAM_ALPHA is stated
BATCH = 100  # the service's and monitor's batch: predictions per test
POWER_SIZES = (25, 50, 100, 200)  # batch sizes `alarm_power` measures
MIN_SHIFT = 0.15  # the rate gap, or the KS distance, must be at least 15 points of share of images
MIN_IMAGES = 15  # fewer images than this (here or on validation): no verdict; Fisher's test is exact at any n
TESTS = "two-sample Kolmogorov-Smirnov on scores; Fisher's exact test on the predicted-positive rate"


def batch_alpha(n: int) -> float:
    """The family-wise alpha of one batch of n images: STREAM_ALPHA spread over the batches that fit in HORIZON."""
    return STREAM_ALPHA / math.ceil(HORIZON / max(n, 1))


def reference_scores(run_dir: str | Path) -> np.ndarray:
    """The run's validation scores, the reference every batch is compared with."""
    path = Path(run_dir) / "val_predictions.csv"
    if not path.is_file():
        raise InputError(f"{path}: missing; the shift alarm needs the run's validation scores "
                         "(covidcxr train writes them)")
    return pd.read_csv(path)["score"].to_numpy(dtype=float)


def validation_disagreement(run_dir: str | Path, threshold: float, positive_label: str) -> float | None:
    """The share of the run's validation images it calls wrong at its threshold: the disagreement with readers to
    expect where the model works as validated; None when the run has no validation scores."""
    path = Path(run_dir) / "val_predictions.csv"
    if not path.is_file():
        return None
    val = pd.read_csv(path)
    return float(((val["score"] >= threshold) != (val["label"] == positive_label)).mean()) if len(val) else None


def shift_test(reference: np.ndarray, scores: np.ndarray, threshold: float, positive_label: str = "positive",
               alpha: float | None = None) -> dict:
    """Compare a batch's scores with the reference at `alpha` (default: batch_alpha of the batch's size); returns the
    tests, rates, p-values and a plain-words verdict."""
    reference, scores = np.asarray(reference, float), np.asarray(scores, float)
    n, n_ref = len(scores), len(reference)
    alpha = batch_alpha(n) if alpha is None else alpha
    out = {"test": TESTS, "alpha": alpha, "multiple_testing": "Bonferroni over 2 tests (each p compared with alpha/2)",
           "false_alarm_rate": f"at most {STREAM_ALPHA:.0%} over {HORIZON} predictions like validation's "
                               f"(batches of {n} tested at alpha {alpha:.3g})",
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


def stream_tests(reference: np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float, batch: int = BATCH,
                 positive_label: str = "positive") -> list[dict]:
    """The alarm over a stream: one test per full batch of consecutive scores (a partial last batch is not tested);
    each result carries `start`, the index of its first score."""
    scores = np.asarray(scores, float)
    return [{**shift_test(reference, scores[i:i + batch], threshold, positive_label), "start": i}
            for i in range(0, len(scores) - batch + 1, batch)]


class ShiftMonitor:
    """The alarm over a stream, as `stream_tests` runs it, fed one prediction at a time (a service, a PACS watcher)."""

    def __init__(self, reference_scores: np.ndarray, threshold: float, batch: int = BATCH,
                 positive_label: str = "positive"):
        self.reference = np.asarray(reference_scores, float)
        self.threshold, self.positive_label, self.batch = threshold, positive_label, batch
        self.pending: list[float] = []
        self.last: dict | None = None  # the latest full batch's test
        self.tested = self.alarms = 0

    def add(self, scores: float | Iterable[float]) -> None:
        """Append newly scored images; each batch is tested once, when it is full."""
        for score in np.atleast_1d(np.asarray(scores, float)).tolist():
            self.pending.append(score)
            if len(self.pending) == self.batch:
                self.last = shift_test(self.reference, np.array(self.pending), self.threshold, self.positive_label)
                self.tested, self.alarms = self.tested + 1, self.alarms + int(self.last["alarm"])
                self.pending = []

    def status(self) -> dict:
        """The latest full batch's test (alarm, rates, p-values, message), and how far the next batch is."""
        latest = self.last or {**shift_test(self.reference, np.zeros(0), self.threshold, self.positive_label,
                                            batch_alpha(self.batch)),
                               "message": f"no verdict yet: the first batch of {self.batch} predictions is not full"}
        return {**latest, "batch": self.batch, "batches_tested": self.tested, "batches_alarmed": self.alarms,
                "in_next_batch": len(self.pending)}


def rate_ci(hits: int, n: int) -> dict:
    """A share with its 95 % Wilson interval (closed form: a monitor computes thousands); None without cases."""
    if not n:
        return {"value": None, "ci95": None, "n": 0}
    p, z = hits / n, float(norm.ppf(0.975))
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return {"value": p, "ci95": [0.0 if hits == 0 else centre - half, 1.0 if hits == n else centre + half], "n": n}


def _alarm_rate(reference: np.ndarray, pool: np.ndarray, n: int, threshold: float, batches: int,
                rng: np.random.Generator) -> dict | None:
    """Share of `batches` random batches of n scores from `pool` (each without replacement) on which the alarm fires;
    None when the pool holds fewer than n scores."""
    if len(pool) < n:
        return None
    hits = sum(shift_test(reference, rng.choice(pool, n, replace=False), threshold)["alarm"] for _ in range(batches))
    return rate_ci(int(hits), batches)


def alarm_power(reference: np.ndarray, threshold: float, own: np.ndarray, held_out: Mapping[str, np.ndarray],
                sizes: Sequence[int] = POWER_SIZES, batches: int = 500, seed: int = 0) -> list[dict]:
    """The alarm's power table: per batch size n, the false-alarm rate on batches drawn from the run's own test split
    (`own`) and the detection rate on each collection in `held_out`, each with a 95 % interval, at alpha(n)."""
    rng = np.random.default_rng(seed)
    reference, own = np.asarray(reference, float), np.asarray(own, float)
    return [{"n": n, "alpha": batch_alpha(n),
             "false_alarm": _alarm_rate(reference, own, n, threshold, batches, rng),
             "detection": {name: _alarm_rate(reference, np.asarray(scores, float), n, threshold, batches, rng)
                           for name, scores in held_out.items()}}
            for n in sizes]


def power_markdown(table: list[dict]) -> str:
    """`alarm_power`'s table in Markdown: a row per batch size, the false-alarm rate and each collection's detection
    rate as "rate [95 % interval]" ("n/a" where a collection has fewer images than the batch)."""
    names = list(table[0]["detection"]) if table else []

    def cell(rate: dict | None) -> str:
        return "n/a" if rate is None else value_ci(rate["value"], rate["ci95"], digits=2)

    return markdown_table(["n", "alpha", "false alarms (own test split)", *(f"detected: {n}" for n in names)],
                          [[row["n"], f"{row['alpha']:.3g}", cell(row["false_alarm"]),
                            *(cell(row["detection"][n]) for n in names)] for row in table])
