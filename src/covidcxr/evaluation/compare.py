"""Put several evaluation reports side by side: one table row per report and one ROC overlay.

Typical use: the in-distribution test beside the leave-one-source-out (external) tests, or several runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from covidcxr.errors import InputError
from covidcxr.evaluation.metrics import METRIC_NAMES
from covidcxr.evaluation.metrics_json import read_metrics
from covidcxr.evaluation.plots import plot_roc_overlay
from covidcxr.formatting import markdown_table, number, value_ci

TABLE_CSV, TABLE_MD, OVERLAY_PNG = "compare.csv", "compare.md", "roc_overlay.png"


def load_report(report_dir: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """metrics.json and predictions.csv of one report folder; one clear error naming the folder otherwise."""
    folder = Path(report_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such report folder")
    metrics = read_metrics(folder / "metrics.json")
    preds_path = folder / "predictions.csv"
    try:
        preds = pd.read_csv(preds_path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{preds_path}: cannot read predictions ({err})") from None
    missing = {"y", "score"} - set(preds.columns)
    if missing:
        raise InputError(f"{preds_path}: missing columns {sorted(missing)}")
    return metrics, preds


def _names(report_dirs: Sequence[Path]) -> list[str]:
    """Folder names, or full paths where two folders share a name."""
    short = [Path(d).name for d in report_dirs]
    return short if len(set(short)) == len(short) else [str(d) for d in report_dirs]


def _row(metrics: dict[str, Any]) -> dict[str, Any]:
    """One report's table row: n, threshold, and each metric with its CI bounds."""
    row: dict[str, Any] = {"n": metrics["n"], "n_patients": metrics.get("n_patients"),
                           "threshold": metrics["threshold"]}
    for m in METRIC_NAMES:
        row[m] = metrics[m]["value"]
        row[f"{m}_lo"], row[f"{m}_hi"] = metrics[m]["ci95"]
    return row


def to_markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table, each metric as 'value [lo, hi]'."""
    rows = [[str(name), str(int(r["n"])), number(r["threshold"]),
             *(value_ci(r[m], (r[f"{m}_lo"], r[f"{m}_hi"])) for m in METRIC_NAMES)] for name, r in table.iterrows()]
    return markdown_table(["report", "n", "threshold", *METRIC_NAMES], rows) + "\n"


def compare_reports(report_dirs: Sequence[str | Path], out: str | Path | None = None) -> pd.DataFrame:
    """One row per report (index: folder name): n, threshold, each metric and its CI bounds (`<metric>_lo/_hi`).

    With `out`, also writes compare.csv, compare.md and roc_overlay.png there.
    """
    if not report_dirs:
        raise InputError("compare needs at least one report folder")
    dirs = [Path(d) for d in report_dirs]
    loaded = [load_report(d) for d in dirs]
    names = _names(dirs)
    rows = [_row(metrics) for metrics, _ in loaded]
    table = pd.DataFrame(rows, index=pd.Index(names, name="report")).apply(pd.to_numeric)  # JSON null -> NaN
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_dir / TABLE_CSV)
        (out_dir / TABLE_MD).write_text(to_markdown(table), encoding="utf-8")
        curves = {name: (preds["y"].to_numpy(), preds["score"].to_numpy()) for name, (_, preds) in zip(names, loaded)}
        plot_roc_overlay(curves, out_dir / OVERLAY_PNG)
    return table
