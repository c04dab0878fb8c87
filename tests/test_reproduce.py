"""`covidcxr reproduce` end to end on toy data: train, test report, every external fold, the main run's diagnostics,
summary."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from covidcxr.reproduce import reproduce

pytestmark = pytest.mark.slow  # the whole main job: it trains a run per fold


def test_reproduce_writes_every_report_and_the_summary(tiny_data, tmp_path):
    summary = reproduce(tiny_data, tmp_path, weights="none", quick=True, device="cpu", n_boot=20)

    text = summary.read_text()
    assert "| paper (Cortes & Sanchez 2021) | 96.5 | 98.0 | 91.7 |" in text
    assert "| ours, in-distribution test split |" in text
    for fold in ("a", "b"):  # tiny_data: two sources, each holding both classes, so each is held out once
        assert f"| ours, external: trained without {fold} |" in text
        assert (tmp_path / "external" / fold / "report" / "report.html").is_file()
        assert not (tmp_path / "external" / fold / "report" / "diagnose").exists()  # the main run's checks only
    verdict = (tmp_path / "main" / "report" / "diagnose" / "verdict.md").read_text().strip()
    assert verdict and verdict in text  # the diagnostics ran on the main report and their verdict is in the summary
    assert "Shortcut diagnostics" in (tmp_path / "main" / "report" / "report.html").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 64  # --quick's settings, saved
    assert "Can a prediction be trusted?" in text and (tmp_path / "trust.csv").is_file()
    trust = (tmp_path / "trust.md").read_text()
    assert trust in text and "| a |" in trust and "| b |" in trust
    rows = pd.read_csv(tmp_path / "trust.csv")
    calibrated = [c for c in rows.columns if c.endswith("_after_auc")]
    assert calibrated and all(f"{c}_ci95_low" in rows and f"{c}_ci95_high" in rows for c in calibrated)
    main_run = tmp_path / "main" / "run"
    assert (main_run / "gate.json").is_file() and not (main_run / "guard.json").exists()
    assert json.loads((tmp_path / "main" / "report" / "metrics.json").read_text())["ood"]["guard"] is False  # opt-in
    assert "gate: held-out films scored" in trust
