"""Scoring a run on data: its own test part, or all of another ingested data set (external validation)."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidcxr.data import tasks
from covidcxr.data.cache import ImageCache
from covidcxr.data.manifest import manifest_hash
from covidcxr.data.splits import listed_rows
from covidcxr.errors import InputError
from covidcxr.evaluation.metrics_json import evaluate_predictions
from covidcxr.evaluation.published import comparison_table
from covidcxr.evaluation.report import write_report
from covidcxr.evaluation.selection import select_images
from covidcxr.evaluation.trust import ood_summary, trust_html
from covidcxr.model.spec import training_kind
from covidcxr.scoring import Scorer
from covidcxr.trust.gate import verdicts as gate_verdicts

log = logging.getLogger(__name__)


def weights_shown(config: dict) -> str:
    """The weights a run started from, as a report shows them: what "auto" chose, and that random init is not
    transfer learning."""
    asked, used = config.get("weights", ""), config.get("weights_used")
    if asked != "auto" or not used:
        return asked
    return "imagenet (auto)" if used == "imagenet" else f"{used} (auto: no ImageNet weights; NOT transfer learning)"


def predictions(run: str | Path, data: str | Path, split: str = "test", device: str = "auto",
                task: str | None = None, images: Collection[str] | None = None,
                gate: bool = True) -> tuple[pd.DataFrame, dict, dict]:
    """(predictions frame with y, status, reason and score, the run's meta, provenance) for the images the task uses.

    The run's gate decides first: a refused image has status "refused", its reason, and no score. `task` overrides
    the run's own task for choosing and labelling images (e.g. score a covid-vs-rest model on covid-vs-normal data,
    so that settings trained on different tasks are compared on the same images); `gate=False` scores every image
    (such comparisons need the same images for every run)."""
    run = Path(run)
    scorer = Scorer.from_run(run, device, guard=True, gate=gate)
    meta = scorer.meta
    cache = ImageCache(data)
    rows, excluded = select_images(run, cache, split) if images is None else (_only(cache, images), 0)
    task = task or meta["task"]
    rows = rows[tasks.encode(rows["label"], task) >= 0].reset_index(drop=True)
    if rows.empty:
        raise InputError(f"{data}: no images with labels that task {task} uses")
    if excluded:
        log.info("note: %d image(s) of %s were used to train or validate this run and are left out", excluded, data)
    pred = rows[["path", "source", "patient_id", "label"]].copy()
    pred["y"] = (tasks.encode(rows["label"], task) == tasks.POSITIVE_INDEX).astype(int)
    squares = cache.load(rows["cache_index"]).numpy()
    verdicts = gate_verdicts(scorer.gate, squares)
    pred["status"] = ["scored" if v is None or v.accepted else "refused" for v in verdicts]
    pred["reason"] = [None if v is None else v.reason for v in verdicts]
    keep = (pred["status"] == "scored").to_numpy()
    score, ood, accepted = scorer.assess(squares[keep])  # float32, as the threshold was chosen
    pred["score"] = np.nan
    pred.loc[keep, "score"] = score
    if scorer.guard is not None:  # the opt-in member guard's figures, for measuring it
        pred["ood_score"], pred["in_distribution"] = np.nan, pd.array([pd.NA] * len(pred), dtype="boolean")
        pred.loc[keep, "ood_score"], pred.loc[keep, "in_distribution"] = ood, accepted
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    provenance = {
        "run": str(run.resolve()), "run_config_hash": meta.get("config_hash", ""), "model_epoch": meta.get("epoch"),
        "run_manifest_hash": meta.get("manifest_hash", ""), "data": str(Path(data).resolve()),
        "data_manifest_hash": manifest_hash(rows), "split": split, "excluded_seen_images": excluded,
        "task": task, "arch": meta["arch"], "weights": weights_shown(config),
        "training": training_kind(str(meta.get("weights_used", ""))),
        "train_sources": ", ".join(config.get("train_sources", [])), "threshold_method": meta.get("threshold_method"),
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
    }
    return pred, meta, provenance


def refusal_counts(pred: pd.DataFrame) -> dict[str, int]:
    """{reason: count} of the images the gate refused, most frequent first."""
    refused = pred.loc[pred["status"] == "refused", "reason"]
    return {str(k): int(v) for k, v in refused.value_counts().items()}


def split_file_images(data: str | Path, files: Collection[str | Path]) -> list[str]:
    """The data folder's images that published split files list (e.g. COVIDx's test.txt), by file name."""
    df = ImageCache(data).manifest(columns=["path"])
    listed = listed_rows(df, list(files)) != ""
    if not listed.any():
        raise InputError(f"{data}: holds none of the images that {', '.join(Path(f).name for f in files)} list")
    return df.loc[listed, "path"].tolist()


def evaluate_split_files(run: str | Path, data: str | Path, files: Collection[str | Path], out: str | Path,
                         **options: Any) -> dict:
    """`evaluate` on the images published split files list (COVIDx's test file), plus REPORT/published_comparison.md:
    COVID-19 sensitivity and PPV with CIs beside the paper's and COVID-Net's published figures."""
    names = ", ".join(Path(f).name for f in files)
    metrics = evaluate(run, data, f"listed in {names}", out, images=split_file_images(data, files), **options)
    ours = (f"covidcxr ({Path(run).name})", f"{Path(data).name}, {names}", metrics)
    (Path(out) / "published_comparison.md").write_text(comparison_table([ours]))
    return metrics


def _only(cache: ImageCache, images: Collection[str]) -> pd.DataFrame:
    rows = cache.manifest()
    return rows[rows["path"].isin(set(images))].reset_index(drop=True)


def evaluate(run: str | Path, data: str | Path, split: str, out: str | Path, n_boot: int = 1000,
             title: str | None = None, extra_sections=(), device: str = "auto", diagnostics: bool = True,
             lung_model: str | Path | None = None, images: Collection[str] | None = None) -> dict:
    """Write the report folder (predictions.csv, metrics.json, figures, report.html); return the metrics.

    `diagnostics`: also run the shortcut checks (diagnose/) on the same images into REPORT/diagnose/ and show them
    in the report: a figure such as the AUC means little until one knows whether it measures the disease.
    `lung_model`: lung segmentation checkpoint for the diagnostics' lung fields (see `diagnose`)."""
    pred, meta, provenance = predictions(run, data, split, device, images=images)
    positive = meta["classes"][int(meta["positive_index"])]
    scored = pred[pred["status"] == "scored"].reset_index(drop=True)
    if scored.empty:
        raise InputError(f"{data}: the run's gate refused all {len(pred)} images ({refusal_counts(pred)}); "
                         "nothing to evaluate")
    metrics = evaluate_predictions(scored, meta["threshold"], meta["threshold_method"], n_boot=n_boot,
                                   provenance=provenance, positive_label=positive)
    metrics["refused"], metrics["n_refused"] = refusal_counts(pred), int(len(pred) - len(scored))
    metrics["ood"] = ood_summary(scored, meta["threshold"], run, positive)
    title = title or f"{Path(run).name} on {Path(data).name} ({split})"
    sections = [("Can these predictions be trusted?", trust_html(metrics["ood"])), *extra_sections]
    write_report(out, pred, metrics, title, provenance, sections)  # on disk before the slower checks start
    if diagnostics:
        chosen = split if split in ("test", "all") else None  # other images (a split file's): diagnose's own choice
        sections.append(("Shortcut diagnostics", _diagnostics_section(run, data, chosen, Path(out) / "diagnose",
                                                                     device, lung_model)))
        write_report(out, pred, metrics, title, provenance, sections)
    return metrics


def _diagnostics_section(run: str | Path, data: str | Path, split: str | None, out: Path, device: str,
                         lung_model: str | Path | None) -> str:
    """The diagnostics as an HTML section; when they cannot run, the reason, in the report and on stderr."""
    from covidcxr.evaluation.diagnose import diagnose, diagnostics_html
    try:
        return diagnostics_html(diagnose(run, data, out, split=split, device=device, lung_model=lung_model), out)
    except ValueError as e:
        log.warning("diagnostics skipped: %s", e)
        return f"<p>The shortcut diagnostics could not run on these images: {html.escape(str(e))}</p>"
