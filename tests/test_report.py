"""The report folder: files, figures that are real images, and a self-contained HTML page with the numbers."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli
from covidcxr.config import IngestConfig
from covidcxr.data.ingest import ingest
from covidcxr.evaluation import plots
from covidcxr.evaluation.metrics import METRIC_NAMES
from covidcxr.evaluation.metrics_json import evaluate_predictions
from covidcxr.evaluation.report import FIGURES, write_report


def _predictions(seed: int = 0, n_patients: int = 60) -> pd.DataFrame:
    """Synthetic predictions from two sources, 1-3 images per patient, informative but imperfect scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        pos = p % 3 == 0
        source = "alpha" if p % 2 else "beta"
        for k in range(rng.integers(1, 4)):
            z = rng.normal(1.2 if pos else -1.2, 1.0)
            rows.append({"path": f"/d/{source}/{p}_{k}.png", "source": source, "patient_id": str(p),
                         "label": "covid" if pos else "normal", "y": int(pos), "score": 1 / (1 + np.exp(-z))})
    return pd.DataFrame(rows)


def _assert_png(path, min_side=300):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side and max(img.size) <= 1400


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    df = _predictions()
    prov = {"run": "runs/<r1>", "config_hash": "c0ffee", "manifest_hash": "feed42", "config": {"arch": "alexnet"}}
    metrics = evaluate_predictions(df, 0.5, "youden", n_boot=200, provenance=prov)
    page = write_report(out, df, metrics, "Test <run> & report", prov,
                        [("Shortcut warning", '<p class="warn">source predictable: <b>0.99</b></p>')])
    return out, page, df, metrics


def test_all_files_are_written(report_dir):
    out, page, _, _ = report_dir
    assert page == out / "report.html"
    for name in ("predictions.csv", "metrics.json", "report.html", *FIGURES):
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        _assert_png(out / name)


def test_metrics_json_and_predictions_round_trip(report_dir):
    out, _, df, metrics = report_dir
    assert json.loads((out / "metrics.json").read_text()) == metrics
    preds = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    pd.testing.assert_frame_equal(preds[df.columns], df, check_exact=False)
    assert (preds["pred"] == (df["score"] >= metrics["threshold"]).astype(int)).all()


def test_html_is_self_contained_with_the_numbers(report_dir):
    out, page, _, metrics = report_dir
    text = page.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(FIGURES)
    assert base64.b64decode(images[0]) == (out / "roc.png").read_bytes()
    Image.open(io.BytesIO(base64.b64decode(images[2]))).verify()
    assert not re.search(r'(src|href)="(?!data:)', text)  # no external assets
    for name in METRIC_NAMES:
        entry = metrics[name]
        assert f"{entry['value']:.3f}" in text and f"{entry['ci95'][0]:.3f}" in text, name
    c = metrics["confusion"]
    assert f"TP {c['tp']}" in text and f"FN {c['fn']}" in text
    for source, s in metrics["per_source"].items():
        assert f">{source}</td><td>{s['n']}</td>" in text


def test_html_escapes_text_and_keeps_caller_snippets(report_dir):
    _, page, _, _ = report_dir
    text = page.read_text()
    assert "<title>Test &lt;run&gt; &amp; report</title>" in text
    assert "runs/&lt;r1&gt;" in text and "c0ffee" in text and "feed42" in text
    assert "<h2>Shortcut warning</h2>" in text and '<p class="warn">source predictable: <b>0.99</b></p>' in text


def test_single_class_data_still_gives_a_report(tmp_path):
    df = _predictions(seed=1)
    df = df[df["y"] == 0].reset_index(drop=True)
    metrics = evaluate_predictions(df, 0.5, "youden", n_boot=50, positive_label="covid")
    page = write_report(tmp_path, df, metrics, "external negatives", {})
    text = page.read_text()
    assert "negatives only" in text and ">n/a<" in text
    _assert_png(tmp_path / "roc.png")


def _cells(text: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`, tags stripped."""
    row = re.search(rf'<tr><td class="k">{re.escape(first_cell)}</td>(.*?)</tr>', text).group(1)
    return [re.sub(r"<[^>]+>", " ", c).split() for c in re.findall(r"<td>(.*?)</td>", row)]


def test_one_class_source_shows_na_not_perfect_ppv(tmp_path):
    """A positives-only source: PPV and PR-AUC would be 1.000 [1, 1] for any model; they are null in metrics.json
    and n/a in report.html's per-source table, beside the sensitivity, which is defined."""
    df = _predictions(seed=4)
    df.loc[df["source"] == "alpha", ["label", "y"]] = ["covid", 1]
    metrics = evaluate_predictions(df, 0.5, "youden", n_boot=50)
    alpha = metrics["per_source"]["alpha"]
    for name in ("specificity", "ppv", "npv", "f1", "balanced_accuracy", "auc", "pr_auc"):
        assert alpha[name] == {"value": None, "ci95": [None, None]}, name
    assert 0 < alpha["sensitivity"]["value"] < 1 and "positives only" in alpha["note"]
    text = write_report(tmp_path, df, metrics, "one source one class", {}).read_text()
    cells = dict(zip(["images", "patients", *METRIC_NAMES], _cells(text, "alpha")))
    for name in ("ppv", "pr_auc", "auc", "specificity"):
        assert cells[name] == ["n/a", "[n/a,", "n/a]"], name
    assert cells["sensitivity"][0] == f"{alpha['sensitivity']['value']:.3f}"
    assert _cells(text, "PPV (precision)")[0] == [f"{metrics['ppv']['value']:.3f}"]  # both classes overall
    assert json.loads((tmp_path / "metrics.json").read_text())["per_source"]["alpha"]["ppv"]["value"] is None


def test_metrics_for_other_predictions_are_refused(tmp_path):
    df = _predictions(seed=2, n_patients=12)
    metrics = evaluate_predictions(df, 0.5, "youden", n_boot=20)
    with pytest.raises(ValueError, match="metrics are for"):
        write_report(tmp_path, df.iloc[:-1], metrics, "t", {})


def test_roc_overlay_and_plots_handle_one_class(tmp_path):
    df = _predictions(seed=3)
    curves = {"in-distribution": (df["y"], df["score"]), "negatives": (np.zeros(5), np.linspace(0, 1, 5))}
    _assert_png(plots.plot_roc_overlay(curves, tmp_path / "overlay.png"))
    _assert_png(plots.plot_score_histograms(np.zeros(5), np.linspace(0, 1, 5), 0.5, tmp_path / "s.png"))


@pytest.mark.slow
def test_evaluate_on_one_class_data_prints_na(tiny_run, xray_source, tmp_path):
    """`covidcxr evaluate` on normals only: the report is written and the summary line says AUC n/a (it crashed
    formatting a null AUC as a number), diagnostics included."""
    (tmp_path / "src").mkdir()
    root = xray_source(tmp_path / "src", 16, seed=9)
    meta = pd.read_csv(root / "metadata.csv")
    meta[meta["label"] == "normal"].to_csv(root / "metadata.csv", index=False)
    data, out = tmp_path / "normals", tmp_path / "report"
    assert ingest([root], data, IngestConfig(size=64, workers=1)).kept == 8
    result = run_cli("evaluate", str(tiny_run), "--data", str(data), "--split", "all", "--out", str(out),
                     "--n-boot", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("AUC n/a (one class)") and "Traceback" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auc"]["value"] is None and metrics["ppv"]["value"] is None and metrics["n"] == 8
    text = (out / "report.html").read_text()
    assert "negatives only" in text and "No sign of shortcut learning" not in text
