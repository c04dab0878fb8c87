"""`covidcxr calibrate`: adapting a run to a shifted site, and the clear errors for sites it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from covidcxr.config import IngestConfig
from covidcxr.data.ingest import ingest
from test_trust import planted_shift, tiny_resnet

pytestmark = pytest.mark.slow  # trains a run to adapt, and runs `covidcxr calibrate` in a subprocess


@pytest.fixture(scope="module")
def base_run(tiny_data, tmp_path_factory) -> Path:
    return tiny_resnet(tiny_data, tmp_path_factory.mktemp("cal") / "run", 0, 6)


def ingested(root: Path, out: Path) -> Path:
    ingest([root], out, IngestConfig(size=64, workers=1))
    return out


@pytest.fixture(scope="module")
def calibrated(base_run, xray_source, tmp_path_factory) -> Path:
    """calibrate on a site with a planted shift (the run calls nearly all of it COVID-19), half of it labelled."""
    tmp = tmp_path_factory.mktemp("site")
    (tmp / "src").mkdir()
    site = ingested(planted_shift(tmp / "src", xray_source, n=80, marks=False, haze=0.15), tmp / "data")
    out = tmp / "out"
    r = run_cli("calibrate", str(base_run), "--data", str(site), "--out", str(out), "--fraction", "0.5",
                "--finetune-epochs", "15", "--n-boot", "20")
    assert r.returncode == 0, r.stderr
    assert "held-back part: sensitivity" in r.stdout
    return out


@pytest.mark.xfail(strict=True, reason="calibrate fine-tunes and re-thresholds on this toy site's 46 calibration "
                   "images without checking that it helps: held-back AUC falls 0.60 -> 0.45 (balanced accuracy "
                   "0.56 -> 0.56). Known limitation until calibrate adapts only when patient-grouped "
                   "cross-validation shows a gain")
def test_calibrate_improves_a_shifted_site(calibrated):
    before = json.loads((calibrated / "before" / "metrics.json").read_text())
    after = json.loads((calibrated / "after" / "metrics.json").read_text())
    assert before["n"] == after["n"] and before["n"] >= 10  # the same held-back images
    assert after["balanced_accuracy"]["value"] > before["balanced_accuracy"]["value"], (before, after)
    assert "ood" in after and "shift" in after["ood"]


def test_calibration_record_and_adapted_run(calibrated, base_run):
    record = json.loads((calibrated / "calibration.json").read_text())
    parts = record["images"]
    assert parts["finetune"] and parts["tune"] and parts["held-back"]
    assert not set(parts["held-back"]) & (set(parts["finetune"]) | set(parts["tune"]))
    assert record["temperature"] > 0 and 0 < record["threshold"] < 1
    after = json.loads((calibrated / "after" / "metrics.json").read_text())
    for m in ("sensitivity", "specificity", "auc"):  # each before/after figure comes with its report's bootstrap CI
        assert record[f"after_{m}"] == after[m]["value"] and record[f"after_{m}_ci95"] == after[m]["ci95"]
        lo, hi = record[f"before_{m}_ci95"]
        assert lo <= record[f"before_{m}"] <= hi
    held = set(pd.read_csv(calibrated / "after" / "predictions.csv")["path"])
    assert held == set(parts["held-back"])
    split = pd.read_csv(calibrated / "run" / "split.csv")
    assert set(split.loc[split["split"] == "test", "path"]) >= held
    reference = pd.read_csv(calibrated / "run" / "val_predictions.csv")
    assert set(parts["tune"]) <= set(reference["path"])  # the shift reference now includes the site


def test_adapted_run_is_a_run_predict_accepts(calibrated, xray_source, tmp_path):
    r = run_cli("predict", str(calibrated / "run"), str(xray_source(tmp_path, 2, seed=4)), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 2


def test_one_class_site_is_refused(base_run, xray_source, tmp_path):
    (tmp_path / "src").mkdir()
    root = xray_source(tmp_path / "src", 30, seed=7)
    meta = pd.read_csv(root / "metadata.csv").assign(label="covid")
    meta.to_csv(root / "metadata.csv", index=False)
    r = run_cli("calibrate", str(base_run), "--data", str(ingested(root, tmp_path / "data")),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "one class only (covid)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_too_small_site_is_refused(base_run, xray_source, tmp_path):
    (tmp_path / "src").mkdir()
    root = xray_source(tmp_path / "src", 8, seed=8)
    r = run_cli("calibrate", str(base_run), "--data", str(ingested(root, tmp_path / "data")),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "too few images to calibrate" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
