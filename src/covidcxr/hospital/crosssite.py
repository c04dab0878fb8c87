"""Can a prediction be trusted at a new site? Measured under the cross-source protocol: each external fold's held-out
sources play a new site.

For each fold run (trained with the main run's recipe, without a gate of its own: the gate's cross-source figures are
benchmarks/bench_gate.py's): whether the shift alarm fires on the held-out images; `calibrate` before/after with 20, 50
and 100 labelled site images and with 30 % of the site and what it chose, then `calibrate --triage` without fine-tuning
on the same images and its triage classes on the held-back images; the triage promise over many draws of 30 % of the
site; and, when asked for (`reproduce --guard`), the member guard: members trained without the fold's sources either
(nested runs, shorter than the fold's: each also leaves out one other fold's sources), its threshold set on half of the
fold's validation patients and its in-distribution coverage measured on the other half, beside the held-out images'
coverage and the share of wrong held-out predictions it flags. Writes DIR/trust.csv, DIR/calibrate.csv, DIR/triage.csv
and DIR/trust.md (also in summary.md).
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
from covidcxr.formatting import markdown_table, number, percent, value_ci
from covidcxr.hospital.calibrate import METRICS, calibrate
from covidcxr.hospital.triage import TooFewForTriage, TriageTargets, enough, fit_triage, triage_summary
from covidcxr.model.spec import READER, RULE_IN, RULE_OUT
from covidcxr.scoring import Scorer
from covidcxr.training.guarding import attach_guard, squares_for
from covidcxr.training.trainer import train

log = logging.getLogger(__name__)

SITE_IMAGES: tuple[int | None, ...] = (20, 50, 100, None)  # labelled site images calibrate gets; None: 30 % of the site
TRIAGE_DRAWS, TRIAGE_SHARE = 200, 0.3  # the triage promise: draws of 30 % of the site's patients to set the thresholds
NESTED_EPOCHS, NESTED_IMAGES, NESTED_MEMBERS = 1, 400, 2  # members: short runs, so that the whole adds ~3 min
MAX_HELD_BACK = 500  # calibrate's before/after on at most this many held-back site images (time)


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


def size_label(n: int | None) -> str:
    return f"{TRIAGE_SHARE:.0%}".replace("%", " %") if n is None else str(n)


def calibrate_rows(fold_run: Path, data: Path, held: list[str], out: Path, n_boot: int) -> list[dict]:
    """`calibrate` with 20, 50, 100 labelled site images and with 30 % of the site: before/after on (at most
    MAX_HELD_BACK of) the rest and its choice; then `calibrate --triage` on the same images (which tries no
    fine-tuning): its triage classes on the held-back images, or how many images it needs."""
    rows = []
    for n in SITE_IMAGES:
        row: dict = {"site_images": size_label(n)}
        settings = CalibrateSettings(n_images=n, fraction=TRIAGE_SHARE, max_held_back=MAX_HELD_BACK, n_boot=n_boot)
        folder = out / f"n{row['site_images'].replace(' %', 'pct')}"
        try:
            r = calibrate(fold_run, data, folder, settings, sources=held)
        except InputError as e:
            rows.append({**row, "note": str(e)})
            continue
        row.update({"choice": r["choice"], "decision": r["decision"],
                    "calibration_images": r["counts"].get("calibration", 0),
                    "held_back_images": r["counts"].get("held-back", 0),
                    **{k: r[k] for k in r if k.startswith(("before_", "after_")) and k != "after_triage"}})
        try:
            t = calibrate(fold_run, data, folder / "triage", replace(settings, triage=True), sources=held)
            row.update({"triage_choice": t["choice"], **triage_cells(t["after_triage"])})
        except TooFewForTriage as e:
            row["triage_note"] = e.reason
        rows.append(row)
    return rows


def triage_cells(summary: dict | None) -> dict:
    """The held-back images' triage classes as flat cells: each class's share, realised NPV / PPV and promise."""
    if not summary:
        return {}
    return {"triage_n": summary["n"], "rule_out_share": summary[RULE_OUT]["share"], "npv": summary[RULE_OUT]["npv"],
            "npv_ci95": summary[RULE_OUT]["npv_ci95"], "npv_promised": summary[RULE_OUT]["promised"],
            "rule_in_share": summary[RULE_IN]["share"], "ppv": summary[RULE_IN]["ppv"],
            "ppv_ci95": summary[RULE_IN]["ppv_ci95"], "ppv_promised": summary[RULE_IN]["promised"],
            "reader_share": summary[READER]["share"]}


def triage_draws(name: str, site: pd.DataFrame, targets: TriageTargets, draws: int = TRIAGE_DRAWS) -> list[dict]:
    """The triage promise over `draws` draws of TRIAGE_SHARE of the site's patients (the fold run's scores as they
    are): thresholds fitted on the drawn patients' images, or on one image per drawn patient (the tests assume
    exchangeable images; a patient's films are not), then each class's share and realised NPV / PPV on the
    other patients' images. `site`: y, score and patient_id of the held-out images."""
    rows = []
    y, scores = site["y"].to_numpy(), site["score"].to_numpy()
    for seed in range(draws):
        calib = patient_uniform(site["patient_id"].astype(str), 1000 + seed) < TRIAGE_SHARE
        one = calib & ~site["patient_id"].duplicated().to_numpy()  # the first image of each drawn patient
        for fitted_on, part in (("images", calib), ("one image per patient", one)):
            if not enough(y[part], targets):
                rows.append({"held_out": name, "fitted_on": fitted_on, "seed": seed, "possible": False})
                continue
            triage = fit_triage(y[part], scores[part], targets)
            rows.append({"held_out": name, "fitted_on": fitted_on, "seed": seed, "possible": True,
                         **triage_cells(triage_summary(y[~calib], scores[~calib], triage))})
    return rows


def measure_fold(name: str, metrics: dict, in_coverage: float | None, members: int | None) -> dict:
    """One row of trust.csv from the fold's external evaluation (metrics.json's `ood`);
    `members` is None when the member guard was not measured."""
    ood = metrics["ood"]
    return {"held_out": name, "guard_members": members, "in_distribution_coverage": in_coverage,
            "held_out_coverage": ood.get("coverage"), "wrong_flagged": ood.get("wrong_flagged"),
            "n_wrong": ood.get("n_wrong"), "alarm": ood["shift"]["alarm"], "shift": ood["shift"]["message"],
            "positive_rate": ood["shift"].get("positive_rate"),
            "val_positive_rate": ood["shift"].get("reference_positive_rate")}


def _ci(row: dict, key: str) -> str:
    """A value with its bootstrap 95 % CI, e.g. 0.52 [0.40, 0.65]; the value alone where there is no interval."""
    return value_ci(row.get(key), row.get(key + "_ci95"), 2, drop_unknown_ci=True)


def _fold_row(r: dict) -> list[str]:
    """One fold's (opt-in) guard and shift-alarm row of trust.md."""
    guard = [] if r["guard_members"] is None else [
        r["guard_members"], percent(r["in_distribution_coverage"]), percent(r["held_out_coverage"]),
        f"{percent(r['wrong_flagged'])} of {r['n_wrong']}"]
    return [r["held_out"], *guard, f"{'fires' if r['alarm'] else 'silent'}: {r['shift']}"]


def _calibration_row(name: str, c: dict) -> list[str]:
    """One fold and site size's calibrate row of trust.md; a site calibrate refused says why."""
    if "note" in c:
        return [name, c["site_images"], f"not possible: {c['note']}", *[""] * len(METRICS)]
    return [name, f"{c['site_images']} ({c['calibration_images']} / {c['held_back_images']})", c["choice"],
            *(f"{_ci(c, 'before_' + m)} -> {_ci(c, 'after_' + m)}" for m in METRICS)]


def _promise(c: dict, key: str) -> str:
    """A realised NPV or PPV with its exact 95 % CI and whether it meets its promise; "no images" for an empty
    class."""
    if c.get(key) is None:
        return "no images"
    met = "meets" if c[key] >= c[key + "_promised"] else "BELOW"
    return f"{value_ci(c[key], c[key + '_ci95'], 2)} ({met} {c[key + '_promised']:.2f})"


def _triage_row(name: str, c: dict) -> list[str]:
    """One fold and site size's triage row: the classes' shares and realised NPV / PPV on the held-back images."""
    if "note" in c:
        return [name, c["site_images"], "", "calibrate refused (above)", "", "", "", ""]
    if "triage_n" not in c:
        return [name, c["site_images"], "", f"not set: {c.get('triage_note', '')}", "", "", "", ""]
    return [name, c["site_images"], c["triage_choice"], percent(c["rule_out_share"]), _promise(c, "npv"),
            percent(c["rule_in_share"]), _promise(c, "ppv"), percent(c["reader_share"])]


def promise_kept(draws: list[dict]) -> dict:
    """How often the realised NPV and PPV met their promise over the draws where triage was possible; a class left
    empty promises nothing and is not counted."""
    npv = [d["npv"] >= d["npv_promised"] for d in draws if d.get("possible") and d["npv"] is not None]
    ppv = [d["ppv"] >= d["ppv_promised"] for d in draws if d.get("possible") and d["ppv"] is not None]
    both = npv + ppv
    return {"draws": len(draws), "possible": sum(bool(d.get("possible")) for d in draws), "npv_met": sum(npv),
            "npv_tested": len(npv), "ppv_met": sum(ppv), "ppv_tested": len(ppv),
            "met_share": sum(both) / len(both) if both else None}


def _by_way(draws: list[dict]) -> dict[str, list[dict]]:
    """The draws grouped by the way their thresholds were fitted, in the order the ways first appear."""
    ways: dict[str, list[dict]] = {}
    for d in draws:
        ways.setdefault(d["fitted_on"], []).append(d)
    return ways


def _draws_rows(name: str, draws: list[dict]) -> list[list[str]]:
    """One fold's triage promise, a row per way the thresholds were fitted."""
    return [_draws_row(name, way, of_way) for way, of_way in _by_way(draws).items()]


def _draws_row(name: str, way: str, draws: list[dict]) -> list[str]:
    """One fold's triage promise over the draws: how often each promise held and the mean shares."""
    k = promise_kept(draws)
    done = [d for d in draws if d.get("possible")]
    if not done:
        return [name, way, f"0 of {k['draws']} (too few of a class)", "", "", "", ""]
    mean = {c: float(np.mean([d[c] for d in done])) for c in ("rule_out_share", "rule_in_share", "reader_share")}
    return [name, way, f"{k['possible']} of {k['draws']}", f"{k['npv_met']} of {k['npv_tested']}",
            f"{k['ppv_met']} of {k['ppv_tested']}", f"{percent(mean['rule_out_share'])} / "
            f"{percent(mean['rule_in_share'])} / {percent(mean['reader_share'])}", percent(k["met_share"])]


def _misses_within_ci(draws: list[dict]) -> tuple[int, int]:
    """(realised NPV / PPV below the promise, of which the exact 95 % CI still reaches the promise)."""
    misses = [(d[k], d[k + "_ci95"], d[k + "_promised"]) for d in draws if d.get("possible") for k in ("npv", "ppv")
              if d.get(k) is not None and d[k] < d[k + "_promised"]]
    return len(misses), sum(ci is not None and ci[1] >= promise for _, ci, promise in misses)


def _targets_line(calibration: dict[str, list[dict]], draws: dict[str, list[dict]]) -> str:
    """The site path's targets, checked on these figures in words."""
    done = [c for cal in calibration.values() for c in cal if "note" not in c]
    worst = min((min(c["after_" + m] - c["before_" + m] for m in ("balanced_accuracy", "auc")
                     if c.get("after_" + m) is not None and c.get("before_" + m) is not None) for c in done),
                default=None)
    share = size_label(None)
    at_share = [f"{name} {number(c.get('after_sensitivity'), 2)} / {number(c.get('after_specificity'), 2)}"
                for name, cal in calibration.items() for c in cal if c["site_images"] == share and "note" not in c]
    ways = []
    for way, of_way in _by_way([d for rows in draws.values() for d in rows]).items():
        misses, within = _misses_within_ci(of_way)
        ways.append(f"{percent(promise_kept(of_way)['met_share'])} with thresholds fitted on {way} ({misses} below "
                    f"the promise, {within} of them with an exact 95 % CI that reaches it)")
    return (f"Largest loss from calibrate in balanced accuracy or AUC over every fold and N: "
            f"{'n/a' if worst is None else f'{min(worst, 0):+.3f}'} (target: no worse than -0.02). After calibrate "
            f"with {share} of the site, sensitivity / specificity on the held-back images: {'; '.join(at_share)} "
            f"(target: 0.85 / 0.70). Triage promises met on the held-back images, over the (fold, draw, promise) "
            f"cases where triage was possible: {'; '.join(ways) or 'none'} (target: at least 90 % at confidence "
            "0.9).")


def trust_markdown(rows: list[dict], calibration: dict[str, list[dict]], draws: dict[str, list[dict]],
                   main_ood: dict) -> str:
    """The trust tables in words and numbers."""
    guarded = bool(rows) and rows[0]["guard_members"] is not None
    columns = ["held out",
               *(["guard members", "in-dist. coverage", "held-out coverage", "wrong flagged"] if guarded else []),
               "shift alarm (all held-out images as one batch)"]
    folds = markdown_table(columns, [_fold_row(r) for r in rows])
    calibrated = markdown_table(["held out", "N (calibration / held back)", "chose", *METRICS],
                                [_calibration_row(name, c) for name, cal in calibration.items() for c in cal])
    triaged = markdown_table(["held out", "N", "chose", "rule-out", "NPV (promise)", "rule-in", "PPV (promise)",
                              "needs a reader"],
                             [_triage_row(name, c) for name, cal in calibration.items() for c in cal])
    promised = markdown_table(["held out", "thresholds fitted on", "draws with triage possible", "NPV promise met",
                               "PPV promise met", "mean rule-out / rule-in / reader", "promises met"],
                              [row for name, d in draws.items() for row in _draws_rows(name, d)])
    lines = ["## Can a prediction be trusted? (cross-source protocol)", "",
             *([f"Member guard (opt-in; main run, members: the fold runs): {percent(main_ood.get('coverage'))} of "
                "the in-distribution test split accepted."] if main_ood.get("guard") else []),
             f"Shift alarm on the test split: {'FIRES' if main_ood['shift']['alarm'] else 'silent'}: "
             f"{main_ood['shift']['message']}.", "",
             "Per fold, the held-out sources play a new site" + ("; the fold's guard members never saw them."
                                                                 if guarded else "."), "",
             folds, "",
             "### calibrate at the site", "",
             "`calibrate` with N labelled site images (20, 50, 100, or 30 % of the site's patients); before "
             "-> after on held-back site images (at most " + str(MAX_HELD_BACK) + "), with patient-level bootstrap "
             "95 % CIs; `chose`: what its patient-grouped cross-validation kept (nothing, threshold, temperature, "
             "head, all).", "", calibrated, "",
             "### Triage at the site", "",
             "`calibrate --triage --candidates nothing,threshold,temperature` on the same images (NPV >= 0.95, "
             "PPV >= 0.90, confidence 0.9; Learn-then-Test with exact two-sample tests): the triage classes of the run "
             "it wrote on the held-back images, with exact 95 % CIs:", "", triaged, "",
             f"The promise over {TRIAGE_DRAWS} draws of {percent(TRIAGE_SHARE)} of each site's patients (thresholds "
             "set on the fold run's scores of the drawn patients, measured on the others):", "", promised, "",
             _targets_line(calibration, draws)]
    return "\n".join(lines) + "\n"


def _split_cis(row: dict) -> dict:
    """A CSV cell holds one number: each `*_ci95` pair becomes `*_ci95_low` and `*_ci95_high`."""
    out = {}
    for k, v in row.items():
        out.update({f"{k}_low": v[0], f"{k}_high": v[1]} if k.endswith("_ci95") and v is not None else {k: v})
    return out


def write_trust(out: Path, rows: list[dict], calibration: dict[str, list[dict]], draws: dict[str, list[dict]],
                main_ood: dict) -> str:
    """DIR/trust.csv (one row per fold), DIR/calibrate.csv (per fold and site size), DIR/triage.csv (per fold and
    draw) and DIR/trust.md; returns the markdown."""
    pd.DataFrame(rows).to_csv(out / "trust.csv", index=False)
    pd.DataFrame([{"held_out": name, **_split_cis(c)} for name, cal in calibration.items() for c in cal]).to_csv(
        out / "calibrate.csv", index=False)
    pd.DataFrame([_split_cis(d) for rows_ in draws.values() for d in rows_]).to_csv(out / "triage.csv", index=False)
    text = trust_markdown(rows, calibration, draws, main_ood)
    (out / "trust.md").write_text(text)
    return text
