"""The shift alarm's power under the cross-source protocol: each fold run's own test split plays the images it was
validated for, its held-out sources a new site.

Per fold: the false-alarm rate on batches of n = 25, 50, 100 and 200 of the run's own test split, the detection rate
on batches of the held-out site, and the model's balanced accuracy on each (the alarm matters where the model gets
worse); then streams that switch: 300 own-split predictions, then the site's, cut into the service's batches of 100,
as the service and `monitor` test them. Writes DIR/alarm_power.csv, DIR/alarm_stream.csv and DIR/alarm.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.evaluation.metrics import binary_metrics
from covidcxr.formatting import markdown_table, number, percent, value_ci
from covidcxr.trust.shift import BATCH, HORIZON, POWER_SIZES, STREAM_ALPHA, alarm_power, rate_ci, stream_tests

POWER_BATCHES = 500  # random batches per size and pool
STREAMS = 500  # switching streams per fold
AFTER_SWITCH = 200  # site predictions in each stream
DETECT_AT, BA_DROP = 100, 0.10  # the target: detect n = 100 batches of a site where balanced accuracy falls this much


def balanced_accuracy(frame: pd.DataFrame, threshold: float) -> float | None:
    """Balanced accuracy of y against score >= threshold; None with one class only."""
    value = binary_metrics(frame["y"], frame["score"], threshold)["balanced_accuracy"]
    return None if value is None or not np.isfinite(value) else float(value)


def fold_power(name: str, reference: np.ndarray, threshold: float, own: pd.DataFrame, site: pd.DataFrame | None,
               seed: int = 0) -> dict:
    """One run's power table (alarm_power at every batch size) with balanced accuracy on both pools. `own` and `site`:
    y and score of the run's own test split and of its held-out site; `site` None: a run that holds nothing out
    (the main run, the one a site serves), whose false alarms alone are measured."""
    held = {} if site is None else {name: site["score"].to_numpy()}
    table = alarm_power(reference, threshold, own["score"].to_numpy(), held, POWER_SIZES, POWER_BATCHES, seed)
    return {"held_out": name, "own_images": len(own), "site_images": 0 if site is None else len(site),
            "ba_own": balanced_accuracy(own, threshold),
            "ba_site": None if site is None else balanced_accuracy(site, threshold),
            "power": table, "stream": switching_streams(reference, threshold, own["score"].to_numpy(),
                                                        None if site is None else site["score"].to_numpy(), seed)}


def passes(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """n draws from the pool in successive random permutations: no film twice before every film has come once.
    Where n nears the pool's size this is what keeps a drawn batch as variable as fresh films of the same sources: a
    batch of n drawn without replacement from a split of N films varies around the sources' distribution by
    (N - n) / (n (N - 1)) + 1 / N, about 1 / n, the variance the alarm's tests assume; drawn with replacement it varies
    by 1 / n + 1 / N (for n = 100 of 258 films, 39 % more), which the alarm reads as a shift."""
    return np.concatenate([rng.permutation(pool) for _ in range(-(-n // len(pool)))])[:n]


def switching_streams(reference: np.ndarray, threshold: float, own: np.ndarray, site: np.ndarray | None,
                      seed: int = 0) -> dict:
    """STREAMS streams of HORIZON own-split scores, then AFTER_SWITCH of the site's (each drawn by `passes`): how
    many stay silent before the switch, how many alarm within BATCH predictions after it, and the median number of
    site predictions to the first alarm (without a site: silence only)."""
    rng = np.random.default_rng(seed)
    silent, caught, delays = 0, 0, []
    for _ in range(STREAMS):
        before = passes(rng, own, HORIZON)
        after = np.zeros(0) if site is None else passes(rng, site, AFTER_SWITCH)
        tests = stream_tests(reference, np.concatenate([before, after]), threshold, BATCH)
        silent += not any(t["alarm"] for t in tests if t["start"] < HORIZON)
        fired = [t["start"] + BATCH - HORIZON for t in tests if t["start"] >= HORIZON and t["alarm"]]
        caught += bool(fired) and fired[0] <= BATCH
        delays.append(fired[0] if fired else np.inf)
    switched = site is not None
    return {"streams": STREAMS, "silent_before": rate_ci(silent, STREAMS),
            "alarm_within_batch": rate_ci(caught, STREAMS) if switched else None,
            "median_to_alarm": float(np.median(delays)) if switched else None}


def _rate(rate: dict | None) -> str:
    return "n/a" if rate is None else value_ci(rate["value"], rate["ci95"], 2)


def _power_rows(f: dict) -> list[list]:
    drop = None if f["ba_own"] is None or f["ba_site"] is None else f["ba_own"] - f["ba_site"]
    ba = f"{number(f['ba_own'], 2)} -> {number(f['ba_site'], 2)}"
    return [[f["held_out"], ba if i == 0 else "", "" if i or drop is None else f"{drop:+.2f}", row["n"],
             f"{row['alpha']:.3g}", _rate(row["false_alarm"]), _rate(row["detection"].get(f["held_out"]))]
            for i, row in enumerate(f["power"])]


def _stream_row(f: dict) -> list:
    s = f["stream"]
    median = s["median_to_alarm"]
    median = "n/a" if median is None else "never" if not np.isfinite(median) else f"{median:.0f}"
    return [f["held_out"], _rate(s["silent_before"]), _rate(s["alarm_within_batch"]), median]


def targets(folds: list[dict]) -> str:
    """The alarm's targets, checked on these figures, in words."""
    worst = {f["held_out"]: max((row["false_alarm"]["value"] for row in f["power"] if row["false_alarm"]),
                                default=None) for f in folds}
    due = [f for f in folds if f["ba_own"] is not None and f["ba_site"] is not None
           and f["ba_own"] - f["ba_site"] >= BA_DROP]
    found = [next(r["detection"][f["held_out"]] for r in f["power"] if r["n"] == DETECT_AT) for f in due]
    lowest = min((r["value"] for r in found if r), default=None)
    return ("Highest false-alarm rate on own-split batches at any n: "
            f"{'; '.join(f'{name} {percent(rate, 1)}' for name, rate in worst.items())} (target: at most "
            f"{percent(STREAM_ALPHA)} for each). Sites where balanced accuracy falls by {BA_DROP:.2f} or more: "
            f"{', '.join(f['held_out'] for f in due) or 'none'}; lowest detection rate of their n = {DETECT_AT} "
            "batches: "
            f"{percent(lowest, 1)} (target: at least 90 %).")


def alarm_markdown(folds: list[dict]) -> str:
    """The power table and the switching streams in words and numbers."""
    power = markdown_table(["held out", "balanced accuracy own -> site", "drop", "n", "alpha",
                            "false alarms (own test split)", "detected (held-out site)"],
                           [r for f in folds for r in _power_rows(f)])
    streams = markdown_table(["held out", f"silent in the first {HORIZON} own-split predictions",
                              f"alarm within {BATCH} predictions of the switch", "median site predictions to alarm"],
                             [_stream_row(f) for f in folds])
    return "\n".join([
        "## The shift alarm's power (cross-source protocol)", "",
        f"Each fold run against its own validation scores: {POWER_BATCHES} random batches of n images from its own "
        "test split (unseen patients of the sources it trained on) and from its held-out site, each tested once at "
        "alpha(n) = 0.05 / ceil(300 / n); rates with 95 % Wilson intervals. The main run, the model a site serves, "
        "holds nothing out: its own test split measures its false alarms alone.", "", power, "",
        f"{STREAMS} streams per fold: {HORIZON} own-split predictions, then {AFTER_SWITCH} of the held-out site, cut "
        f"into batches of {BATCH} as the service and `monitor` test them. Films are drawn in successive random "
        "permutations of their pool, no film twice before every film has come once: a batch drawn so from a split of N "
        "films varies about as much as fresh films would (drawn with replacement it varies 1 / N more, which the alarm "
        "reads as a shift).", "", streams, "", targets(folds), ""])


def write_alarm(out: Path, folds: list[dict]) -> str:
    """DIR/alarm_power.csv (per fold and n), DIR/alarm_stream.csv (per fold) and DIR/alarm.md; returns the markdown."""
    pd.DataFrame([{"held_out": f["held_out"], "ba_own": f["ba_own"], "ba_site": f["ba_site"], "n": r["n"],
                   "alpha": r["alpha"], "false_alarm": (r["false_alarm"] or {}).get("value"),
                   "detection": (r["detection"].get(f["held_out"]) or {}).get("value")}
                  for f in folds for r in f["power"]]).to_csv(out / "alarm_power.csv", index=False)
    pd.DataFrame([{"held_out": f["held_out"], "silent_before": f["stream"]["silent_before"]["value"],
                   "alarm_within_batch": (f["stream"]["alarm_within_batch"] or {}).get("value"),
                   "median_to_alarm": f["stream"]["median_to_alarm"]} for f in folds]).to_csv(
        out / "alarm_stream.csv", index=False)
    text = alarm_markdown(folds)
    (out / "alarm.md").write_text(text)
    return text
