"""`covidcxr experiment`: a grid of training settings under a cross-source protocol, compared with CIs over seeds.

Each setting is trained once per seed on the in-distribution split and once per external fold (sources held out of
training, then tested on), and scored on the same images with the same task, so settings are comparable.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from covidcxr.config import ExperimentConfig, TrainConfig, config_hash, read_yaml, save_json, to_dict
from covidcxr.data import tasks
from covidcxr.data.cache import ImageCache
from covidcxr.data.splits import external_folds
from covidcxr.errors import InputError
from covidcxr.evaluation.evaluate import predictions
from covidcxr.formatting import markdown_table, value_ci
from covidcxr.training.trainer import train

plt.switch_backend("Agg")  # files only, no display: works wherever the CLI runs

FIXED_SENSITIVITY = 0.9


def load_grid(path: str | Path, data: str | None = None) -> ExperimentConfig:
    """The experiment YAML as an ExperimentConfig (`data` overrides its data folder). Every key and setting is checked
    here, before anything is trained; a bad one is one line naming the file."""
    spec = read_yaml(path, "experiment settings (data, settings, ...)")
    if data:
        spec["data"] = str(data)
    try:
        grid = ExperimentConfig.from_mapping(spec)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    tasks.check_task(grid.eval_task)  # the task names live with the data, a later stage than config
    return grid


def held_out_folds(grid: ExperimentConfig) -> list[list[str]]:
    """The in-distribution fold ([]) and the external folds of the data, limited to the grid's `folds` if given."""
    available = external_folds(ImageCache(grid.data).manifest(), grid.eval_task)
    if not grid.folds:
        return [[]] + available
    names = ["+".join(f) for f in available]
    unknown = [f for f in grid.folds if f not in names]
    if unknown:
        raise InputError(f"folds {', '.join(unknown)} are not external folds of {grid.data} "
                         f"(available: {', '.join(names) or 'none'})")
    return [[]] + [f for f in available if "+".join(f) in grid.folds]


def spec_at_fixed_sensitivity(y: np.ndarray, score: np.ndarray, sensitivity: float = FIXED_SENSITIVITY) -> float:
    """Specificity where the ROC first reaches the given sensitivity: compares settings at one operating point."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(1 - fpr[np.argmax(tpr >= sensitivity)])


def score_run(run: Path, data: str, task: str) -> dict:
    """A run's test-split figures on the grid's task, so every setting is scored on the same images."""
    pred, meta, _ = predictions(run, data, "test", task=task, gate=False)  # every setting on the same images
    y, s = pred["y"].to_numpy(), pred["score"].to_numpy()
    both = 0 < y.sum() < len(y)
    called = s >= meta["threshold"]
    return {"n": len(y), "auc": roc_auc_score(y, s) if both else np.nan,
            "sensitivity": called[y == 1].mean() if y.any() else np.nan,
            "specificity": (~called[y == 0]).mean() if (y == 0).any() else np.nan,
            "spec_at_sens90": spec_at_fixed_sensitivity(y, s) if both else np.nan}


def run_experiment(config: str | Path, out: str | Path, data: str | None = None) -> pd.DataFrame:
    """Train and score every (setting, seed, fold); write results.csv, summary.csv/md and comparison.png, and the
    grid's settings (experiment.json; experiment.yaml, which `covidcxr experiment` takes back)."""
    grid, out = load_grid(config, data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.csv"
    done = pd.read_csv(results_path, dtype={"setting": str, "fold": str}) if results_path.exists() else pd.DataFrame()
    rows = done.to_dict("records")
    finished = {(r["setting"], r["seed"], r["fold"]) for r in rows}
    jobs = grid_jobs(grid, held_out_folds(grid), out)
    for name, seed, fold, cfg in jobs:  # all reused rows checked before anything is trained
        if (name, seed, fold) in finished:
            check_same_settings(Path(cfg.out), cfg)
    save_json(to_dict(grid), out / "experiment.json")
    (out / "experiment.yaml").write_text(yaml.safe_dump(to_dict(grid), sort_keys=False))
    for name, seed, fold, cfg in jobs:
        if (name, seed, fold) in finished:
            continue  # finished earlier: an interrupted grid resumes where it stopped
        rows.append({"setting": name, "seed": seed, "fold": fold, **run_job(cfg, grid)})
        pd.DataFrame(rows).to_csv(results_path, index=False)
        if not grid.keep_checkpoints:  # only once its row is saved: a grid cut off here need not retrain it
            for checkpoint in ("model.pt", "last.pt"):  # a large grid would fill the disk
                (Path(cfg.out) / checkpoint).unlink(missing_ok=True)
    summary = summarize(pd.DataFrame(rows))
    summary.to_csv(out / "summary.csv")
    (out / "summary.md").write_text(to_markdown(summary, grid))
    plot_comparison(summary, out / "comparison.png")
    return summary


def run_job(cfg: TrainConfig, grid: ExperimentConfig) -> dict:
    """Train one run (resuming a cut-off one) and score it on the grid's task: a row of results.csv, less its keys."""
    run_dir, start = Path(cfg.out), time.time()
    train(cfg, resume=(run_dir / "last.pt").exists())
    return {**score_run(run_dir, grid.data, grid.eval_task), "seconds": round(time.time() - start, 1)}


def grid_jobs(grid: ExperimentConfig, folds: list[list[str]], out: Path) -> list[tuple[str, int, str, TrainConfig]]:
    """(setting, seed, fold, config) of every run; seeds outermost, so a grid cut short still compares every setting."""
    jobs = []
    for seed in grid.seeds:
        for name in grid.settings:
            base = grid.train_config(name)
            for held in folds:
                fold = "+".join(held) or "in-distribution"
                cfg = replace(base, data=str(grid.data), out=str(out / "runs" / name / f"seed{seed}" / fold),
                              seed=seed, holdout_sources=held)
                jobs.append((name, seed, fold, cfg))
    return jobs


def check_same_settings(run_dir: Path, cfg: TrainConfig) -> None:
    """A finished row is only reused when its run was trained with the settings asked for now."""
    saved = run_dir / "config.json"
    if saved.exists() and json.loads(saved.read_text()).get("config_hash") != config_hash(cfg):
        raise InputError(f"{run_dir} was trained with other settings than the experiment now asks for; "
                         "use a new --out (or remove its row from results.csv to retrain it)")


def _mean_ci(values: pd.Series) -> tuple[float, float, float]:
    """Mean over seeds with a 95 % t-interval (NaN width for a single seed)."""
    v = values.dropna().to_numpy()
    if len(v) == 0:
        return np.nan, np.nan, np.nan
    if len(v) == 1:
        return float(v[0]), np.nan, np.nan
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per setting: in-distribution AUC and, averaged over external folds per seed, cross-source metrics."""
    records = {}
    for name, sub in results.groupby("setting", sort=False):
        ind = sub[sub["fold"] == "in-distribution"].set_index("seed")
        ext = sub[sub["fold"] != "in-distribution"].groupby("seed")
        rec = {}
        for label, series in [("in_auc", ind["auc"]), ("in_spec_at_sens90", ind["spec_at_sens90"]),
                              ("cross_auc", ext["auc"].mean()), ("cross_spec_at_sens90", ext["spec_at_sens90"].mean()),
                              ("cross_sensitivity", ext["sensitivity"].mean()),
                              ("cross_specificity", ext["specificity"].mean())]:
            rec[label], rec[label + "_lo"], rec[label + "_hi"] = _mean_ci(series)
        rec["seeds"] = sub["seed"].nunique()
        records[name] = rec
    return pd.DataFrame.from_dict(records, orient="index").sort_values("cross_auc", ascending=False)


def to_markdown(summary: pd.DataFrame, grid: ExperimentConfig) -> str:
    """summary.md: one row per setting, each figure with its t-interval over seeds (none for a single seed)."""
    cols = ["in_auc", "cross_auc", "cross_spec_at_sens90", "cross_sensitivity", "cross_specificity"]
    table = markdown_table(["setting", *cols, "seeds"], [
        [name, *(value_ci(row[c], (row[c + "_lo"], row[c + "_hi"]), drop_unknown_ci=True) for c in cols),
         int(row["seeds"])] for name, row in summary.iterrows()])
    best = summary.index[0]
    return ("# Experiment: cross-source comparison\n\n"
            f"Evaluation task {grid.eval_task}; mean over seeds with 95 % t-intervals; cross-source values are "
            "averaged over the external folds (sources held out of training). spec_at_sens90: specificity where "
            f"sensitivity first reaches {FIXED_SENSITIVITY:.0%} on the held-out images.\n\n" + table
            + f"\n\nBest cross-source AUC: **{best}**.\n")


def plot_comparison(summary: pd.DataFrame, path: Path) -> None:
    """comparison.png: in-distribution beside cross-source AUC per setting, with their intervals."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(summary)), 4.5))
    x = np.arange(len(summary))
    bars = [("in_auc", "in-distribution AUC"), ("cross_auc", "cross-source AUC")]
    for offset, (col, label) in zip((-0.2, 0.2), bars):
        err = np.vstack([summary[col] - summary[col + "_lo"], summary[col + "_hi"] - summary[col]])
        ax.bar(x + offset, summary[col], 0.4, yerr=np.nan_to_num(err), capsize=3, label=label)
    ax.axhline(0.5, color="gray", lw=1, ls="--", label="chance")
    ax.set_xticks(x, summary.index, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUC (mean over seeds, 95 % CI)")
    ax.set_title("Settings: in-distribution vs cross-source AUC")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
