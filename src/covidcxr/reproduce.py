"""`covidcxr reproduce`: the paper's experiment end to end, then the checks the paper lacked.

ingest -> patient-level split -> fine-tune the gray AlexNet -> test-split report -> external validation (sources held
out of training, each fold trained with the main run's recipe) -> shortcut probe -> the site path under the
cross-source protocol (calibrate, triage, the shift alarm's power) -> summary.md with the paper's table beside ours.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd

from covidcxr.config import GateSettings, IngestConfig, TrainConfig, save_json, to_dict
from covidcxr.data.cache import CACHE_META, ImageCache
from covidcxr.data.ingest import ingest
from covidcxr.data.splits import INTERNAL_TEST, MIN_CLASS, external_folds
from covidcxr.errors import MissingInputError
from covidcxr.evaluation.evaluate import evaluate, predictions
from covidcxr.evaluation.metrics import binary_metrics
from covidcxr.evaluation.published import PAPER, PAPER_NAME
from covidcxr.formatting import markdown_table, number, value_ci
from covidcxr.hospital.crosssite import (
    calibrate_rows,
    guard_fold,
    measure_fold,
    nested_members,
    triage_draws,
    write_trust,
)
from covidcxr.hospital.shiftpower import fold_power, write_alarm
from covidcxr.hospital.triage import TriageTargets
from covidcxr.model.weights import resolve_weights
from covidcxr.training.guarding import attach_guard
from covidcxr.training.trainer import train
from covidcxr.trust.shift import reference_scores

log = logging.getLogger(__name__)

METRICS = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")
OWN_COLUMNS = ["y", "score", "patient_id"]  # what the alarm's power and the training table read of a split
MAIN_HELD_OUT = "none (main run)"  # the main run's row in the alarm's power table


def prepare_data(data: str | Path, out: Path) -> Path:
    """An ingested data folder as given, or one made from database folder(s) under out/data."""
    data = Path(data)
    if (data / CACHE_META).exists():
        return data
    if not data.exists():
        raise MissingInputError(f"{data}: no such folder; pass --data with database folders or an ingested data folder "
                                f"(covidcxr data download --to {data} fetches the public ones)")
    report = ingest([data], out / "data", IngestConfig())
    if report.unreadable:
        log.warning("%d unreadable file(s) skipped; see %s", len(report.unreadable),
                    out / "data" / "ingest_report.json")
    return out / "data"


QUICK_GATE_STEPS = 100  # --quick: a gate that runs, not one to rely on


def recipe(data: Path, out: Path, weights: str, device: str, quick: bool,
           image_size: int | str = "auto", gate_negatives: str = "") -> TrainConfig:
    """The default training recipe (see README), made smaller with --quick (a smoke test, not a result)."""
    cfg = TrainConfig(data=str(data), out=str(out), weights=weights, device=device, image_size=image_size,
                      gate=GateSettings(negatives=gate_negatives))
    if quick:
        cfg = replace(cfg, epochs=1, image_size=64, max_train_images=200, patience=1,
                      gate=replace(cfg.gate, steps=QUICK_GATE_STEPS))
    return cfg


def fold_config(cfg: TrainConfig, held: list[str], out: Path) -> TrainConfig:
    """An external fold's run: the main run's recipe (epochs, early stopping, augmentation, split fractions) with
    `held` left out. No gate of its own: gates are measured across sources by benchmarks/bench_gate.py, and the fold
    runs score every held-out image alike."""
    return replace(cfg, out=str(out), holdout_sources=held, gate=replace(cfg.gate, enabled=False))


def training_row(name: str, run: Path, own_auc: float | None, site_auc: float | None) -> dict:
    """How a run trained (history.csv): epochs, final training loss, best validation AUC; and its AUC on its own
    test split and on the held-out site."""
    history = pd.read_csv(run / "history.csv")
    return {"run": name, "epochs": len(history), "final_train_loss": float(history["train_loss"].iloc[-1]),
            "best_val_auc": float(history["val_auc"].max()), "own_test_auc": own_auc, "held_out_auc": site_auc}


def training_markdown(rows: list[dict]) -> str:
    """The main run and the fold runs side by side, so a reader can see they were trained alike."""
    table = markdown_table(["run", "epochs", "final training loss", "best validation AUC", "own test split AUC",
                            "held-out site AUC"],
                           [[r["run"], r["epochs"], number(r["final_train_loss"], 3), number(r["best_val_auc"], 3),
                             number(r["own_test_auc"], 3), number(r["held_out_auc"], 3)] for r in rows])
    return "\n".join(["## How the runs trained", "",
                       "Every fold run uses the main run's recipe (the same epochs, early stopping, augmentation and "
                       "split fractions); its own test split is the main run's test patients of the sources it "
                       "trained on (ln 2 = 0.693 is the training loss of a model that has learnt nothing).", "",
                       table, ""])


def _table_row(name: str, metrics: dict) -> list[str]:
    """One evaluation's row of summary.md's table: each metric in % with its bootstrap interval, then n."""
    cells = [value_ci((metrics.get(k) or {}).get("value"), (metrics.get(k) or {}).get("ci95"), 1, 100,
                      drop_unknown_ci=True) for k in METRICS]
    return [name, *cells, metrics["n"]]


def _results_table(main: dict, external: dict[str, dict]) -> str:
    """The paper's figures beside ours: the in-distribution test split and each external fold."""
    paper = [PAPER_NAME, *(number(PAPER[k], 1, 100) if k in PAPER else "-" for k in METRICS),
             "11,312 (all splits)"]
    ours = [_table_row("ours, in-distribution test split", main)]
    ours += [_table_row(f"ours, external: trained without {name}", m) for name, m in external.items()]
    return markdown_table(["evaluation", *METRICS, "n"], [paper, *ours])


def write_summary(out: Path, main: dict, external: dict[str, dict], diagnosis_verdict: str,
                  weights_note: str | None, cfg: TrainConfig, trust: str = "") -> Path:
    """summary.md: the paper's table beside ours, the external validation in words, the trust
    measurement, the shortcut verdict and the settings; returns its path."""
    lines = ["# covidcxr reproduce: summary", ""]
    if weights_note:
        lines += [f"> **Warning:** {weights_note}", ""]
    lines += ["Cortes & Sanchez (2021) fine-tuned an ImageNet AlexNet with a gray first layer for COVID-19 vs healthy.",
              "Values in %, with 95 % patient-level bootstrap confidence intervals; threshold chosen on validation "
              "data.", "", _results_table(main, external)]
    lines += ["", "## What the external validation shows", "", _external_words(main, external), "",
              trust, "## Shortcut diagnostics", "", diagnosis_verdict, "",
              "Details, figures and lung masks: `main/report/diagnose/diagnose.html`.", "",
              "## Settings", "", f"```json\n{json.dumps(to_dict(cfg), indent=1)}\n```", "",
              "Reports: `main/report/report.html`, "
              + ", ".join(f"`external/{n}/report/report.html`" for n in external)]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _both_classes(metrics: dict) -> bool:
    """An AUC worth averaging: at least MIN_CLASS images of each class in the held-out test."""
    c = metrics["confusion"]
    return min(c["tp"] + c["fn"], c["tn"] + c["fp"]) >= MIN_CLASS and metrics["auc"]["value"] is not None


def _external_words(main: dict, external: dict[str, dict]) -> str:
    """One clause per held-out fold, then the mean cross-source AUC against the in-distribution one, in words."""
    if not external:
        return "No source could be held out (every class comes from one source)."
    parts = [f"held out {name}: AUC {number(m['auc']['value'], 2)}, "
             f"sensitivity {number(m['sensitivity']['value'], 2)}, "
             f"specificity {number(m['specificity']['value'], 2)}" for name, m in external.items()]
    aucs = [m["auc"]["value"] for m in external.values() if _both_classes(m)]
    in_auc = main["auc"]["value"]
    if not aucs or in_auc is None:
        return "; ".join(parts) + "."
    mean = sum(aucs) / len(aucs)
    drop = in_auc - mean
    conclusion = ("A large drop means the in-distribution figures mostly measure recognising the collection, not the "
                  "disease." if drop > 0.1 else "The model's signal largely survives a change of collection.")
    return ("; ".join(parts) + f". On collections it never saw (folds with at least {MIN_CLASS} images of each class), "
            f"the mean AUC is {number(mean, 2)} against {number(in_auc, 2)} in-distribution "
            f"({'a drop of ' + number(drop, 2) if drop > 0 else 'no drop'}). {conclusion}")


def reproduce(data: str | Path, out: str | Path, weights: str = "auto", quick: bool = False, device: str = "auto",
              n_boot: int = 1000, image_size: int | str = "auto", guard: bool = False,
              gate_negatives: str | Path = "") -> Path:
    """Run everything; returns the path of summary.md.

    `gate_negatives`: a folder of lateral films, CT slices, ... that every run's gate is also shown. `guard`: also
    fit and measure the member guard (models trained with other sources held out; opt-in: it flagged few of the
    wrong predictions at new sites, and costs the service more than half its throughput)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(data, out)
    weights, note = resolve_weights(weights, TrainConfig().arch)
    extra = [("Warning", f"<p>{html.escape(note)}</p>")] if note else []
    cfg = recipe(data_dir, out / "main" / "run", weights, device, quick, image_size, str(gate_negatives))
    save_json(cfg, out / "config.json")
    run = train(cfg, resume=(out / "main" / "run" / "last.pt").exists())
    folds = external_folds(ImageCache(data_dir).manifest(), cfg.task)
    fold_runs = {}
    for held in folds:
        fold_out = out / "external" / "+".join(held)
        fold_runs["+".join(held)] = train(fold_config(cfg, held, fold_out / "run"),
                                          resume=(fold_out / "run" / "last.pt").exists())
    if guard and fold_runs:  # the member guard: the models trained with each source group held out
        attach_guard(run, [r / "model.pt" for r in fold_runs.values()], data_dir)
    main = evaluate(run, data_dir, "test", out / "main" / "report", n_boot=n_boot, title="In-distribution test split",
                    extra_sections=extra, device=device)
    external, trust_rows, calibration, draws, alarms = {}, [], {}, {}, []
    trained = [training_row("main (all sources)", run, main["auc"]["value"], None)]
    own_main = pd.read_csv(out / "main" / "report" / "predictions.csv")[OWN_COLUMNS].dropna()
    alarms.append(fold_power(MAIN_HELD_OUT, reference_scores(run), main["threshold"], own_main, None))
    for held, (name, fold_run) in zip(folds, fold_runs.items()):
        fold_out = out / "external" / name
        members = nested_members(cfg, held, folds, fold_out / "guard_members") if guard else []
        in_coverage = guard_fold(fold_run, members, data_dir) if guard else None
        external[name] = evaluate(fold_run, data_dir, "test", fold_out / "report", n_boot=n_boot, extra_sections=extra,
                                  title=f"External validation: trained without {name}", device=device,
                                  diagnostics=False)  # the shortcut checks are the main run's (time)
        own, site = own_and_site(fold_run, data_dir, fold_out / "report", device)
        trained.append(training_row(f"without {name}", fold_run, auc(own, external[name]["threshold"]),
                                    external[name]["auc"]["value"]))
        trust_rows.append(measure_fold(name, external[name], in_coverage, len(members) if guard else None))
        alarms.append(fold_power(name, reference_scores(fold_run), external[name]["threshold"], own, site))
        if site["y"].nunique() < 2:  # a one-class site: calibrate refuses, triage promises nothing
            continue
        calibration[name] = calibrate_rows(fold_run, data_dir, held, fold_out / "calibrate", min(n_boot, 200))
        draws[name] = triage_draws(name, site, TriageTargets())
    pd.DataFrame(trained).to_csv(out / "training.csv", index=False)
    trust = "\n".join([training_markdown(trained), write_trust(out, trust_rows, calibration, draws, main["ood"]),
                       write_alarm(out, alarms)])
    diagnosis = out / "main" / "report" / "diagnose" / "verdict.md"
    return write_summary(out, main, external, diagnosis.read_text().strip() if diagnosis.exists() else
                         "The shortcut diagnostics could not run (see main/report/report.html).", note, cfg, trust)


def own_and_site(fold_run: Path, data: Path, report: Path, device: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the fold run's own test split, the held-out site): y, score and patient_id of each, as the run scores them."""
    split = pd.read_csv(fold_run / "split.csv")
    own = predictions(fold_run, data, "all", device, images=split.loc[split["split"] == INTERNAL_TEST, "path"],
                      gate=False)[0]
    site = pd.read_csv(report / "predictions.csv")
    return own[OWN_COLUMNS].dropna().reset_index(drop=True), site[OWN_COLUMNS].dropna().reset_index(drop=True)


def auc(frame: pd.DataFrame, threshold: float) -> float | None:
    """AUC of y against score; None with one class only."""
    return binary_metrics(frame["y"], frame["score"], threshold)["auc"] if frame["y"].nunique() == 2 else None
