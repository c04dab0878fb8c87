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
    main_run = tmp_path / "main" / "run"
    assert (main_run / "gate.json").is_file() and not (main_run / "guard.json").exists()
    assert json.loads((tmp_path / "main" / "report" / "metrics.json").read_text())["ood"]["guard"] is False  # opt-in
    _check_the_site_path(tmp_path, text)


def _check_the_site_path(out, text: str) -> None:
    """Fold runs trained like the main run, shown beside it; calibrate and triage per fold and site size; the alarm's
    power per fold and batch size; every table in summary.md and in its CSV."""
    main_cfg = json.loads((out / "config.json").read_text())
    for fold in ("a", "b"):
        fold_cfg = json.loads((out / "external" / fold / "run" / "config.json").read_text())
        assert (fold_cfg["epochs"], fold_cfg["patience"], fold_cfg["augment"]) == (
            main_cfg["epochs"], main_cfg["patience"], main_cfg["augment"])
        split = pd.read_csv(out / "external" / fold / "run" / "split.csv")
        assert set(split.loc[split["source"] == fold, "split"]) == {"test"}
        assert "internal-test" in set(split.loc[split["source"] != fold, "split"])  # its own test split
    trained = pd.read_csv(out / "training.csv")
    assert list(trained["run"]) == ["main (all sources)", "without a", "without b"]
    assert trained["best_val_auc"].between(0, 1).all() and trained["held_out_auc"].iloc[1:].notna().all()
    assert "## How the runs trained" in text
    calibrated = pd.read_csv(out / "calibrate.csv")
    assert list(calibrated.groupby("held_out")["site_images"].apply(list)) == [["20", "50", "100", "30 %"]] * 2
    done = calibrated[calibrated["note"].isna()] if "note" in calibrated else calibrated
    assert len(done) and done["choice"].isin(["nothing", "threshold", "temperature", "head", "all"]).all()
    assert {"before_balanced_accuracy", "after_auc_ci95_low"} <= set(done.columns)
    triaged = pd.read_csv(out / "triage.csv")
    assert set(triaged["fitted_on"]) == {"images", "one image per patient"} and "### Triage at the site" in text
    power = pd.read_csv(out / "alarm_power.csv")
    assert sorted(power["n"].unique()) == [25, 50, 100, 200]
    assert set(power["held_out"]) == {"none (main run)", "a", "b"}  # the served run's false alarms, then each fold
    assert power["false_alarm"].dropna().between(0, 1).all()
    assert power.loc[power["held_out"] == "none (main run)", "detection"].isna().all()
    assert len(pd.read_csv(out / "alarm_stream.csv")) == 3 and "The shift alarm's power" in text
