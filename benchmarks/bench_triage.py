"""What triage's test promises, measured on a reproduce run's held-out sites: covidcxr's test of the rate a site
counts (exact two-sample p-values for the next batch of a class as large as its calibration images) beside the test
of the long-run rate it replaced (exact binomial p-values), both in the same Learn-then-Test fixed sequence.

For every fold whose site has both classes: 200 draws of 30 % of the site's patients (as reproduce draws them); the
thresholds set on the drawn patients' films with each test, then each promise judged on the other patients' films
(what a site counts) and on all the site's films (the long-run rate). Prints a table and writes
docs/results/bench_triage.md.

    python benchmarks/bench_triage.py [--reproduce reproduce] [--draws 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
from scipy.stats import binom

from covidcxr.data.splits import patient_uniform
from covidcxr.formatting import markdown_table, percent
from covidcxr.hospital import triage
from covidcxr.hospital.crosssite import TRIAGE_SHARE
from covidcxr.model.spec import RULE_IN, RULE_OUT

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench_triage.md"
PROMISES = ((RULE_OUT, "npv"), (RULE_IN, "ppv"))


def long_run_p_values(correct_in_order: np.ndarray, target: float) -> np.ndarray:
    """The test covidcxr used before: P(Binomial(k, target) >= correct among the first k), the one-sided
    Clopper-Pearson p-value for "the long-run rate of the first k is below target"."""
    k = np.arange(1, len(correct_in_order) + 1)
    return binom.sf(np.cumsum(correct_in_order) - 1, k, target)


def judged(summary: dict) -> dict:
    """Per promise, from triage_summary: whether its class took images and whether their realised rate meets it."""
    return {key: (summary[name]["n"] > 0, bool(summary[name]["met"])) for name, key in PROMISES}


def draws(site: pd.DataFrame, targets: triage.TriageTargets, n_draws: int) -> list[dict]:
    """One row per draw and promise: set on the drawn patients, judged on the others and on all films."""
    y, scores, rows = site["y"].to_numpy(), site["score"].to_numpy(), []
    for seed in range(n_draws):
        calib = patient_uniform(site["patient_id"].astype(str), 1000 + seed) < TRIAGE_SHARE
        if not triage.enough(y[calib], targets):
            continue
        rule = triage.fit_triage(y[calib], scores[calib], targets)
        shares = triage.triage_summary(y[~calib], scores[~calib], rule)
        held, everything = judged(shares), judged(triage.triage_summary(y, scores, rule))
        for name, key in PROMISES:
            rows.append({"promise": key, "set": held[key][0], "met_held_back": held[key][1],
                         "met_all_films": everything[key][1], "share": shares[name]["share"]})
    return rows


def summarise(fold: str, test: str, rows: list[dict], n_draws: int) -> list[str]:
    """One table row: how often each promise was set, and met on the held-back films and on all films."""
    if not rows:
        return [fold, test, "never possible (too few of a class)", "", "", "", ""]
    frame = pd.DataFrame(rows)
    cells = []
    for key in ("npv", "ppv"):
        part = frame[frame["promise"] == key]
        kept = part[part["set"]]
        cells.append(f"{len(kept)} of {n_draws}: {kept['met_held_back'].sum()} / {kept['met_all_films'].sum()}")
    kept = frame[frame["set"]]
    shares = " / ".join(percent(frame.loc[frame["promise"] == k, "share"].mean()) for k in ("npv", "ppv"))
    return [fold, test, *cells, shares, percent(kept["met_held_back"].mean()), percent(kept["met_all_films"].mean())]


def site_scores(fold: Path) -> pd.DataFrame:
    """The held-out site's scored films (y, score, patient_id) as reproduce's evaluation of the fold wrote them."""
    frame = pd.read_csv(fold / "report" / "predictions.csv")
    return frame.loc[frame["status"] == "scored", ["y", "score", "patient_id"]].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reproduce", type=Path, default=Path("reproduce"),
                        help="a `covidcxr reproduce` output folder (default reproduce)")
    parser.add_argument("--draws", type=int, default=200, help="draws of the site's patients per fold (default 200)")
    a = parser.parse_args()
    targets, table, pooled = triage.TriageTargets(), [], {"two-sample (batch)": [], "binomial (long run)": []}
    for fold in sorted((a.reproduce / "external").iterdir()):
        site = site_scores(fold)
        if site["y"].nunique() < 2:
            continue
        for test, p_values in (("two-sample (batch)", triage.p_values), ("binomial (long run)", long_run_p_values)):
            with mock.patch.object(triage, "p_values", p_values):  # the same fixed sequence, another test
                rows = draws(site, targets, a.draws)
            table.append(summarise(fold.name, test, rows, a.draws))
            pooled[test] += [r for r in rows if r["set"]]
    header = ["held out", "test", "NPV: draws set: met held back / met all films",
              "PPV: draws set: met held back / met all films", "mean rule-out / rule-in share (held back)",
              "promises met (held back)", "promises met (all films)"]
    lines = [f"Triage promises (NPV >= {targets.npv}, PPV >= {targets.ppv}, confidence {targets.confidence}) over "
             f"{a.draws} draws of {percent(TRIAGE_SHARE)} of each site's patients, thresholds set on the drawn "
             f"patients' films ({a.reproduce}). \"All films\" includes the calibration films: the long-run rate as "
             "near as the site allows.", "", markdown_table(header, table), ""]
    for test, rows in pooled.items():
        frame = pd.DataFrame(rows)
        lines.append(f"{test}: promises met on the held-back films in {percent(frame['met_held_back'].mean(), 1)} of "
                     f"{len(frame)} cases, on all the site's films in {percent(frame['met_all_films'].mean(), 1)}.")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
