"""Can a prediction be trusted at a new site? Measured under the cross-source protocol: each external fold's held-out
sources play a new site.

For each fold run: how many of the held-out collections' frontal films its gate scores (the rest it refuses);
whether the shift alarm fires; `calibrate` before/after with 20, 50 and 100 labelled site images; and, when asked
for (`reproduce --guard`), the member guard: members trained without the fold's sources either (nested runs, shorter
than the fold's: each also leaves out one other fold's sources), its threshold set on half of the fold's validation
patients and its in-distribution coverage measured on the other half, beside the held-out images' coverage and the
share of wrong held-out predictions it flags. Writes DIR/trust.csv and DIR/trust.md (also in summary.md).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.config import CalibrateSettings, TrainConfig
from covidcxr.data.splits import patient_uniform
from covidcxr.errors import InputError
from covidcxr.formatting import markdown_table, percent, value_ci
from covidcxr.hospital.calibrate import METRICS, calibrate
from covidcxr.scoring import Scorer
from covidcxr.training.guarding import attach_guard, squares_for
from covidcxr.training.trainer import train

log = logging.getLogger(__name__)

SITE_IMAGES = (20, 50, 100)
NESTED_EPOCHS, NESTED_IMAGES, NESTED_MEMBERS = 1, 400, 2  # members: short runs, so that the whole adds ~3 min
MAX_HELD_BACK = 200  # calibrate's before/after on at most this many held-back site images (time)


def nested_members(cfg: TrainConfig, held: list[str], folds: list[list[str]], out: Path) -> list[Path]:
    """model.pt of short runs trained without `held` and without one other fold's sources each."""
    members = []
    for other in [f for f in folds if f != held][:NESTED_MEMBERS]:
        member_cfg = replace(cfg, out=str(out / "+".join(other)), holdout_sources=held + other,
                             epochs=min(cfg.epochs, NESTED_EPOCHS),
                             max_train_images=min(cfg.max_train_images or NESTED_IMAGES, NESTED_IMAGES))
        try:
            members.append(train(member_cfg, resume=(out / "+".join(other) / "last.pt").exists()) / "model.pt")
        except ValueError as e:  # e.g. the remaining sources' validation part lacks a class
            log.warning("no guard member without %s: %s", "+".join(held + other), e)
    return members


def guard_fold(fold_run: Path, members: list[Path], data: Path) -> float | None:
    """Fit the guard on half of the validation patients; returns its coverage on the other half."""
    val = pd.read_csv(fold_run / "val_predictions.csv")
    fit = patient_uniform(val["patient_id"].astype(str), seed=14) < 0.5
    attach_guard(fold_run, members, data, paths=val.loc[fit, "path"], density=not members)
    scorer = Scorer.from_run(fold_run, "cpu", guard=True, gate=False)
    _, _, accepted = scorer.assess(squares_for(data, val.loc[~fit, "path"]))
    return float(np.mean(accepted)) if accepted is not None and len(accepted) else None


def calibrate_rows(fold_run: Path, data: Path, held: list[str], out: Path, n_boot: int) -> list[dict]:
    """calibrate with 20, 50, 100 labelled site images: before/after on (at most MAX_HELD_BACK of) the rest."""
    rows = []
    for n in SITE_IMAGES:
        try:
            settings = CalibrateSettings(n_images=n, max_held_back=MAX_HELD_BACK, n_boot=n_boot)
            r = calibrate(fold_run, data, out / f"n{n}", settings, sources=held)
            rows.append({"site_images": n, **{k: r[k] for k in r if k.startswith(("before_", "after_"))}})
        except InputError as e:
            rows.append({"site_images": n, "note": str(e)})
    return rows


def measure_fold(name: str, metrics: dict, in_coverage: float | None, members: int | None) -> dict:
    """One row of trust.csv from the fold's external evaluation (metrics.json's `ood` and the gate's refusals);
    `members` is None when the member guard was not measured."""
    ood, refused = metrics["ood"], metrics.get("n_refused", 0)
    return {"held_out": name, "gate_scored": metrics["n"] / (metrics["n"] + refused), "gate_refused": refused,
            "guard_members": members, "in_distribution_coverage": in_coverage,
            "held_out_coverage": ood.get("coverage"), "wrong_flagged": ood.get("wrong_flagged"),
            "n_wrong": ood.get("n_wrong"), "alarm": ood["shift"]["alarm"], "shift": ood["shift"]["message"],
            "positive_rate": ood["shift"].get("positive_rate"),
            "val_positive_rate": ood["shift"].get("reference_positive_rate")}


def _ci(row: dict, key: str) -> str:
    """A value with its bootstrap 95 % CI, e.g. 0.52 [0.40, 0.65]; the value alone where there is no interval."""
    return value_ci(row[key], row.get(key + "_ci95"), 2, drop_unknown_ci=True)


def _fold_row(r: dict) -> list[str]:
    """One fold's gate, (opt-in) guard and shift-alarm row of trust.md."""
    guard = [] if r["guard_members"] is None else [
        r["guard_members"], percent(r["in_distribution_coverage"]), percent(r["held_out_coverage"]),
        f"{percent(r['wrong_flagged'])} of {r['n_wrong']}"]
    return [r["held_out"], f"{percent(r['gate_scored'], 1)} ({r['gate_refused']} refused)", *guard,
            f"{'fires' if r['alarm'] else 'silent'}: {r['shift']}"]


def _calibration_row(name: str, c: dict) -> list[str]:
    """One fold and site size's calibrate row of trust.md; a site calibrate refused says why."""
    if "note" in c:
        return [name, c["site_images"], f"not possible: {c['note']}", "", ""]
    return [name, c["site_images"], *(f"{_ci(c, 'before_' + m)} -> {_ci(c, 'after_' + m)}" for m in METRICS)]


def trust_markdown(rows: list[dict], calibration: dict[str, list[dict]], main_ood: dict) -> str:
    """The trust tables in words and numbers."""
    guarded = bool(rows) and rows[0]["guard_members"] is not None
    columns = ["held out", "gate: held-out films scored",
               *(["guard members", "in-dist. coverage", "held-out coverage", "wrong flagged"] if guarded else []),
               "shift alarm"]
    folds = markdown_table(columns, [_fold_row(r) for r in rows])
    calibrated = markdown_table(["held out", "N", "sensitivity", "specificity", "AUC"],
                                [_calibration_row(name, c) for name, cal in calibration.items() for c in cal])
    lines = ["## Can a prediction be trusted? (cross-source protocol)", "",
             *([f"Member guard (opt-in; main run, members: the fold runs): {percent(main_ood.get('coverage'))} of "
                "the in-distribution test split accepted."] if main_ood.get("guard") else []),
             f"Shift alarm on the test split: {'FIRES' if main_ood['shift']['alarm'] else 'silent'}: "
             f"{main_ood['shift']['message']}.", "",
             "Per fold, the held-out sources play a new site: the fold's gate (fitted on the other sources' films) "
             "decides which of their frontal films are scored" + ("; the fold's guard members never saw them."
                                                                  if guarded else "."), "",
             folds, "",
             "calibrate with N labelled site images (before -> after, on held-back site images; bootstrap 95 % CIs):",
             "", calibrated]
    return "\n".join(lines) + "\n"


def _split_cis(row: dict) -> dict:
    """A CSV cell holds one number: each `*_ci95` pair becomes `*_ci95_low` and `*_ci95_high`."""
    out = {}
    for k, v in row.items():
        out.update({f"{k}_low": v[0], f"{k}_high": v[1]} if k.endswith("_ci95") and v is not None else {k: v})
    return out


def write_trust(out: Path, rows: list[dict], calibration: dict[str, list[dict]], main_ood: dict) -> str:
    """DIR/trust.csv (one row per fold and site size) and DIR/trust.md; returns the markdown."""
    flat = [{**r, **{f"n{c['site_images']}_{k}": v for c in calibration.get(r["held_out"], [])
                     for k, v in _split_cis(c).items() if k != "site_images"}} for r in rows]
    pd.DataFrame(flat).to_csv(out / "trust.csv", index=False)
    text = trust_markdown(rows, calibration, main_ood)
    (out / "trust.md").write_text(text)
    return text
