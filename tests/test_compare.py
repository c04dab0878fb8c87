"""Comparing report folders: the table carries each report's numbers, and bad folders are named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr.evaluation.compare import compare_reports, to_markdown
from covidcxr.evaluation.metrics import METRIC_NAMES
from covidcxr.evaluation.metrics_json import evaluate_predictions, write_metrics


def _make_report(folder, seed: int, noise: float, negatives_only: bool = False):
    """A report folder as evaluate writes it (metrics.json + predictions.csv), without the figures."""
    rng = np.random.default_rng(seed)
    n = 80
    y = np.zeros(n, int) if negatives_only else (np.arange(n) % 2)
    score = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, noise, n), 0, 1)
    df = pd.DataFrame({"path": [f"{i}.png" for i in range(n)], "source": "s",
                       "patient_id": [str(i // 2) for i in range(n)], "label": np.where(y == 1, "covid", "normal"),
                       "y": y, "score": score})
    metrics = evaluate_predictions(df, 0.5, "youden", n_boot=100, positive_label="covid")
    folder.mkdir(parents=True)
    write_metrics(metrics, folder / "metrics.json")
    df.to_csv(folder / "predictions.csv", index=False)
    return metrics


def test_table_holds_each_reports_values_and_files_are_written(tmp_path):
    good = _make_report(tmp_path / "internal", seed=0, noise=0.2)
    worse = _make_report(tmp_path / "external", seed=1, noise=0.5)
    out = tmp_path / "cmp"
    table = compare_reports([tmp_path / "internal", tmp_path / "external"], out)
    assert list(table.index) == ["internal", "external"]
    for name, metrics in (("internal", good), ("external", worse)):
        for m in METRIC_NAMES:
            assert table.loc[name, m] == pytest.approx(metrics[m]["value"])
            assert [table.loc[name, f"{m}_lo"], table.loc[name, f"{m}_hi"]] == pytest.approx(metrics[m]["ci95"])
        assert table.loc[name, "n"] == metrics["n"]
    assert table.loc["internal", "auc"] > table.loc["external", "auc"]

    back = pd.read_csv(out / "compare.csv", index_col="report")
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    md = (out / "compare.md").read_text()
    auc = good["auc"]
    assert "| internal | 80 |" in md and f"{auc['value']:.3f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]" in md
    with Image.open(out / "roc_overlay.png") as img:
        assert img.format == "PNG" and min(img.size) >= 300


def test_undefined_values_show_as_na(tmp_path):
    _make_report(tmp_path / "negs", seed=2, noise=0.2, negatives_only=True)
    table = compare_reports([tmp_path / "negs"])
    assert np.isnan(table.loc["negs", "auc"])
    assert "n/a [n/a, n/a]" in to_markdown(table)


def test_same_folder_names_are_told_apart_by_path(tmp_path):
    _make_report(tmp_path / "a" / "test", seed=0, noise=0.2)
    _make_report(tmp_path / "b" / "test", seed=1, noise=0.2)
    table = compare_reports([tmp_path / "a" / "test", tmp_path / "b" / "test"])
    assert list(table.index) == [str(tmp_path / "a" / "test"), str(tmp_path / "b" / "test")]


def test_bad_report_folders_are_named(tmp_path):
    _make_report(tmp_path / "ok", seed=0, noise=0.2)
    with pytest.raises(ValueError, match=r"missing.*no such report folder"):
        compare_reports([tmp_path / "ok", tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.metrics\.json: cannot read"):
        compare_reports([tmp_path / "empty"])
    _make_report(tmp_path / "nocols", seed=0, noise=0.2)
    pd.DataFrame({"path": ["x.png"]}).to_csv(tmp_path / "nocols" / "predictions.csv", index=False)
    with pytest.raises(ValueError, match=r"nocols.predictions\.csv: missing columns \['score', 'y'\]"):
        compare_reports([tmp_path / "nocols"])
    with pytest.raises(ValueError, match="at least one"):
        compare_reports([])
