"""One evaluation as a folder: predictions.csv, metrics.json, the figures and a self-contained report.html.

The HTML page embeds its figures as base64 data URLs and has no external assets, so it can be mailed or
archived as a single file. It is built from plain string templates; every piece of text is escaped except
the caller's `extra_sections` bodies, which are trusted HTML snippets (warnings, shortcut diagnostics).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from covidcxr import __version__
from covidcxr.evaluation import plots
from covidcxr.evaluation.metrics import METRIC_NAMES
from covidcxr.evaluation.metrics_json import write_metrics
from covidcxr.formatting import interval, number

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity (recall)",
    "specificity": "Specificity",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1",
    "balanced_accuracy": "Balanced accuracy",
    "auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
}
FIGURES = {  # file -> alt text, in page order (two columns; the wide confusion figure spans both)
    "roc.png": "ROC curve",
    "scores.png": "Score distributions",
    "confusion.png": "Confusion matrix",
    "calibration.png": "Calibration",
}
_WIDE_FIGURES = {"confusion.png"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right;
vertical-align:top}th{background:#f4f4f4}td.k,th.k{text-align:left}.ci{color:#666;font-size:.85em}
.sub{color:#555}.figs{display:grid;grid-template-columns:1fr 1fr;gap:1em;align-items:start}
.figs figure{margin:0}.figs figure.wide{grid-column:1/-1;text-align:center}.figs img{width:100%;border:1px solid #eee}
.figs figure.wide img{max-width:800px}
pre{margin:0;font-size:.85em;text-align:left;white-space:pre-wrap}.scroll{overflow-x:auto}
.note{color:#8a5a00}
"""


def _value_ci(entry: Mapping[str, Any]) -> str:
    """A metric's value with its interval below it, for a table cell."""
    return f'{number(entry["value"])}<br><span class="ci">{interval(entry["ci95"])}</span>'


def class_names(pred_df: pd.DataFrame, positive_label: str) -> tuple[str, str]:
    """(negative, positive) display names; several negative labels (covid-vs-rest) are joined."""
    negatives = sorted(pred_df.loc[pred_df["y"] == 0, "label"].astype(str).unique())
    return ("/".join(negatives) if negatives else "negative", positive_label)


def draw_figures(out_dir: Path, pred_df: pd.DataFrame, metrics: Mapping[str, Any]) -> dict[str, Path]:
    """The four report figures, written into out_dir; returns file name -> path."""
    y, score = pred_df["y"].to_numpy(), pred_df["score"].to_numpy()
    labels = class_names(pred_df, metrics["positive_label"])
    threshold = metrics["threshold"]
    return {
        "roc.png": plots.plot_roc(y, score, metrics["auc"]["value"], metrics["auc"]["ci95"], threshold,
                                  out_dir / "roc.png"),
        "confusion.png": plots.plot_confusion(metrics["confusion"], out_dir / "confusion.png", labels),
        "calibration.png": plots.plot_calibration(metrics["calibration"]["bins"], metrics["calibration"]["ece"],
                                                  out_dir / "calibration.png"),
        "scores.png": plots.plot_score_histograms(y, score, threshold, out_dir / "scores.png", labels),
    }


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    """Every metric with its 95 % interval."""
    rows = "".join(
        f'<tr><td class="k">{METRIC_LABELS[m]}</td><td>{number(metrics[m]["value"])}</td>'
        f'<td>{number(metrics[m]["ci95"][0])} &ndash; {number(metrics[m]["ci95"][1])}</td></tr>'
        for m in METRIC_NAMES
    )
    return f'<table><tr><th class="k">metric</th><th>value</th><th>95 % CI</th></tr>{rows}</table>'


def _confusion_table(confusion: Mapping[str, int], labels: tuple[str, str]) -> str:
    """The confusion counts with the classes' own names, so nobody has to guess which way round."""
    neg, pos = (html.escape(label) for label in labels)
    return (
        f'<table><tr><th></th><th>called {neg}</th><th>called {pos}</th></tr>'
        f'<tr><th class="k">true {neg}</th><td>TN {confusion["tn"]}</td><td>FP {confusion["fp"]}</td></tr>'
        f'<tr><th class="k">true {pos}</th><td>FN {confusion["fn"]}</td><td>TP {confusion["tp"]}</td></tr></table>'
    )


def _per_source_table(per_source: Mapping[str, Mapping[str, Any]]) -> str:
    """Every metric per source: a model can be good on average and poor on one collection."""
    head = "".join(f"<th>{METRIC_LABELS[m]}</th>" for m in METRIC_NAMES)
    rows = "".join(
        f'<tr><td class="k">{html.escape(src)}</td><td>{s["n"]}</td><td>{s["n_patients"]}</td>'
        + "".join(f"<td>{_value_ci(s[m])}</td>" for m in METRIC_NAMES)
        + "</tr>"
        for src, s in per_source.items()
    )
    notes = "".join(f"<li><b>{html.escape(src)}</b>: {html.escape(s['note'])}</li>"
                    for src, s in per_source.items() if s.get("note"))
    return (f'<div class="scroll"><table><tr><th class="k">source</th><th>images</th><th>patients</th>{head}</tr>'
            f"{rows}</table></div>" + (f'<ul class="note">{notes}</ul>' if notes else ""))


def _kv_table(items: Mapping[str, Any]) -> str:
    """Provenance as key/value rows (nested values as JSON), so a report names what made it."""
    def cell(v: Any) -> str:
        if isinstance(v, (Mapping, list, tuple)):
            return f"<pre>{html.escape(json.dumps(v, indent=2, default=str))}</pre>"
        return html.escape(str(v))

    rows = "".join(f'<tr><th class="k">{html.escape(str(k))}</th><td class="k">{cell(v)}</td></tr>'
                   for k, v in items.items())
    return f"<table>{rows}</table>"


def _figures_html(figures: Mapping[str, Path]) -> str:
    """The figures embedded as data URLs, so the page is one self-contained file."""
    def embed(path: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")

    return '<div class="figs">' + "".join(
        f'<figure{" class=wide" if name in _WIDE_FIGURES else ""}><img alt="{alt}" src="{embed(figures[name])}">'
        "</figure>"
        for name, alt in FIGURES.items()
    ) + "</div>"


def render_html(
    title: str,
    pred_df: pd.DataFrame,
    metrics: Mapping[str, Any],
    figures: Mapping[str, Path],
    provenance: Mapping[str, Any],
    extra_sections: Sequence[tuple[str, str]] = (),
) -> str:
    """The whole report page as one string."""
    labels = class_names(pred_df, metrics["positive_label"])
    cal = metrics["calibration"]
    written = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = (
        f'{metrics["n"]} images from {metrics["n_patients"]} patients; positive class '
        f'<b>{html.escape(labels[1])}</b>, negative <b>{html.escape(labels[0])}</b>; threshold '
        f'{number(metrics["threshold"])} ({html.escape(str(metrics["threshold_method"]))}); '
        "95 % intervals from a patient-level bootstrap."
    )
    if metrics.get("n_refused"):
        why = "; ".join(f"{n} {html.escape(reason)}" for reason, n in metrics["refused"].items())
        summary += (f'<br><b>{metrics["n_refused"]} image(s) refused by the gate</b> (not frontal chest radiographs, '
                    f"so not scored and not in any figure here): {why}.")
    if metrics.get("note"):
        summary += f'<br><span class="note">{html.escape(metrics["note"])}</span>'

    extras = "".join(f"<h2>{html.escape(head)}</h2>\n{body}\n" for head, body in extra_sections)
    run_info = {"report written": written, "covidcxr version": __version__, **provenance}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="sub">{summary}</p>
{extras}<h2>Metrics</h2>
{_metrics_table(metrics)}
<h2>Confusion counts</h2>
{_confusion_table(metrics["confusion"], labels)}
<h2>Figures</h2>
{_figures_html(figures)}
<h2>Calibration</h2>
<p>Expected calibration error {number(cal["ece"])}; Brier score {number(cal["brier"])}.</p>
<h2>Per source</h2>
{_per_source_table(metrics["per_source"])}
<h2>Provenance</h2>
{_kv_table(run_info)}
</body></html>
"""


def write_report(
    out_dir: str | Path,
    pred_df: pd.DataFrame,
    metrics: Mapping[str, Any],
    title: str,
    provenance: Mapping[str, Any],
    extra_sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write predictions.csv, metrics.json, roc/confusion/calibration/scores.png and report.html; returns the page.

    `metrics` is evaluate_predictions' output for the scored rows of `pred_df` (rows whose `status` is not "scored",
    when there is such a column, are listed in predictions.csv without a prediction and counted in the page);
    `extra_sections` are (heading, HTML body) pairs shown near the top.
    """
    scored = pred_df[pred_df["status"] == "scored"] if "status" in pred_df else pred_df
    if len(scored) != metrics["n"]:
        raise ValueError(f"metrics are for {metrics['n']} predictions but {len(scored)} were given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    called = (pred_df["score"] >= metrics["threshold"]).astype("Int64").mask(pred_df["score"].isna())
    pred_df.assign(pred=called).to_csv(out / "predictions.csv", index=False)
    write_metrics(metrics, out / "metrics.json")
    figures = draw_figures(out, scored, metrics)
    page = out / "report.html"
    page.write_text(render_html(title, scored, metrics, figures, provenance, extra_sections), encoding="utf-8")
    return page
