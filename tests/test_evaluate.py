"""`covidcxr evaluate`: the report folder, which images are scored, and a threshold that never sees test labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli
from covidcxr import cli
from covidcxr.config import IngestConfig
from covidcxr.data.ingest import ingest
from covidcxr.evaluation import bootstrap as bootstrap_mod
from covidcxr.evaluation import evaluate as evaluate_mod
from covidcxr.evaluation import metrics as metrics_mod
from covidcxr.evaluation import metrics_json as metrics_json_mod
from covidcxr.evaluation.evaluate import evaluate
from covidcxr.evaluation.metrics import METRIC_NAMES
from covidcxr.model import threshold as threshold_mod
from covidcxr.model.checkpoint import load_checkpoint
from covidcxr.model.threshold import choose_threshold

N_BOOT = 50  # enough to exercise the bootstrap; the intervals' accuracy is test_metrics' business


@pytest.fixture(scope="module")
def test_report(tiny_run, tiny_data, tmp_path_factory) -> Path:
    """`covidcxr evaluate RUN --data DATA --split test --out REPORT` on the run's own data."""
    out = tmp_path_factory.mktemp("report") / "report"
    argv = ["evaluate", str(tiny_run), "--data", str(tiny_data), "--split", "test", "--out", str(out),
            "--n-boot", str(N_BOOT)]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def other_data(xray_source, tmp_path_factory) -> Path:
    """Another ingested data set (sources c and d) that the run has never seen."""
    root = xray_source(tmp_path_factory.mktemp("other_src"), 12, seed=5, sources=("c", "d"))
    data = tmp_path_factory.mktemp("other_data")
    assert ingest([root], data, IngestConfig(size=64, workers=1)).kept == 12
    return data


def _paths(run: Path, *parts: str) -> set[str]:
    split = pd.read_csv(run / "split.csv")
    return set(split.loc[split["split"].isin(parts), "path"])


def _meta(run: Path) -> dict:
    return load_checkpoint(run / "model.pt")["meta"]


def test_report_folder_holds_the_test_split_scored_at_the_runs_threshold(test_report, tiny_run, tiny_data):
    for name in ("predictions.csv", "metrics.json", "roc.png", "confusion.png", "calibration.png", "report.html"):
        assert (test_report / name).is_file(), name
    pred = pd.read_csv(test_report / "predictions.csv")
    assert {"path", "source", "patient_id", "label", "score"} <= set(pred.columns)
    assert len(pred) == pred["path"].nunique()
    assert set(pred["path"]) == _paths(tiny_run, "test")  # exactly the run's test rows, nothing else
    assert pred["score"].between(0, 1).all()

    m = json.loads((test_report / "metrics.json").read_text())
    for name in METRIC_NAMES:
        value, (lo, hi) = m[name]["value"], m[name]["ci95"]
        assert value is not None and lo <= hi, name
    assert m["threshold"] == _meta(tiny_run)["threshold"] and m["threshold_method"] == "youden"
    y = pred["label"].eq("covid").to_numpy()
    called = pred["score"].to_numpy(np.float32) >= np.float32(m["threshold"])  # scores are float32 in the CSV
    assert m["confusion"] == {"tp": int((y & called).sum()), "fp": int((~y & called).sum()),
                              "tn": int((~y & ~called).sum()), "fn": int((y & ~called).sum())}
    assert m["accuracy"]["value"] == pytest.approx((y == called).mean())
    assert m["n"] == len(pred) and m["n_patients"] == pred.groupby(["source", "patient_id"]).ngroups
    assert set(m["per_source"]) == set(pred["source"].astype(str))
    for source, sub in pred.groupby("source"):
        assert m["per_source"][source]["n"] == len(sub)
    assert set(m["calibration"]) >= {"ece", "brier"} and m["positive_label"] == "covid"
    config = json.loads((tiny_run / "config.json").read_text())
    assert m["provenance"]["run_config_hash"] == config["config_hash"]
    assert m["provenance"]["data_manifest_hash"]

    for name in ("roc.png", "confusion.png", "calibration.png"):
        with Image.open(test_report / name) as img:
            assert img.format == "PNG" and min(img.size) >= 300, name
    page = (test_report / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "<script src" not in page  # self-contained


def test_every_report_holds_the_shortcut_diagnostics_of_its_images(test_report):
    diagnosis = json.loads((test_report / "diagnose" / "diagnose.json").read_text())
    scored = len(pd.read_csv(test_report / "predictions.csv"))
    assert diagnosis["split"] == "test" and diagnosis["n_images"] == scored
    assert {"source_probe", "occlusion", "image_stats", "cam", "flags"} <= set(diagnosis)
    page = (test_report / "report.html").read_text()
    assert "Shortcut diagnostics" in page and 'alt="Lung masks"' in page  # figures embedded: one file to send


@pytest.mark.slow
def test_no_diagnose_skips_them_and_failing_diagnostics_keep_the_report(tiny_run, tiny_data, tmp_path, monkeypatch,
                                                                        capsys):
    argv = ["evaluate", str(tiny_run), "--data", str(tiny_data), "--out", str(tmp_path / "plain"), "--n-boot", "20"]
    assert cli.main([*argv, "--no-diagnose"]) == 0
    assert not (tmp_path / "plain" / "diagnose").exists()
    assert "Shortcut diagnostics" not in (tmp_path / "plain" / "report.html").read_text()

    def broken(*args, **kwargs):
        raise ValueError("too few images of each source")

    monkeypatch.setattr("covidcxr.evaluation.diagnose.diagnose", broken)
    assert cli.main([*argv[:-4], "--out", str(tmp_path / "failed"), "--n-boot", "20"]) == 0
    assert "diagnostics skipped: too few images of each source" in capsys.readouterr().err
    page = (tmp_path / "failed" / "report.html").read_text()
    assert "could not run on these images: too few images of each source" in page
    assert (tmp_path / "failed" / "metrics.json").is_file()


@pytest.mark.slow
def test_split_all_on_the_runs_own_data_leaves_out_what_it_trained_on(tiny_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "all"
    argv = ["evaluate", str(tiny_run), "--data", str(tiny_data), "--split", "all", "--out", str(out),
            "--n-boot", str(N_BOOT)]
    assert cli.main(argv) == 0
    seen = _paths(tiny_run, "train", "val")
    assert f"note: {len(seen)} image(s)" in capsys.readouterr().err
    pred = pd.read_csv(out / "predictions.csv")
    assert not set(pred["path"]) & seen
    assert set(pred["path"]) == _paths(tiny_run, "test")  # tiny_data holds nothing else
    assert json.loads((out / "metrics.json").read_text())["provenance"]["excluded_seen_images"] == len(seen)


@pytest.mark.slow
def test_another_data_set_needs_split_all(tiny_run, other_data, tmp_path, capsys):
    out = tmp_path / "external"
    argv = ["evaluate", str(tiny_run), "--data", str(other_data), "--out", str(out), "--n-boot", str(N_BOOT)]
    assert cli.main([*argv, "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--split all" in err and "Traceback" not in err
    assert not (out / "metrics.json").exists()

    assert cli.main([*argv, "--split", "all"]) == 0
    assert "note:" not in capsys.readouterr().err  # nothing of another data set was seen in training
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 12 and set(pred["source"]) == {"c", "d"}


def test_threshold_is_chosen_on_the_runs_validation_predictions(tiny_run):
    val = pd.read_csv(tiny_run / "val_predictions.csv")
    assert set(val["path"]) == _paths(tiny_run, "val")
    meta = _meta(tiny_run)
    threshold = choose_threshold(val["label"].eq("covid").astype(int), val["score"].to_numpy(np.float32),
                                 meta["threshold_method"])
    assert threshold == meta["threshold"]


@pytest.mark.slow
def test_threshold_does_not_depend_on_test_labels(test_report, tiny_run, tiny_data, tmp_path, monkeypatch):
    """Flip the labels of the test images in a copy of the data: the metrics flip, the threshold stays put."""
    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_data, flipped)
    manifest = pd.read_parquet(flipped / "manifest.parquet")
    test = manifest["path"].isin(_paths(tiny_run, "test"))
    manifest.loc[test, "label"] = manifest.loc[test, "label"].map({"covid": "normal", "normal": "covid"})
    manifest.to_parquet(flipped / "manifest.parquet")

    def no_tuning(*args, **kwargs):
        raise AssertionError("evaluation must not choose a threshold")

    for module in (metrics_mod, bootstrap_mod, metrics_json_mod, evaluate_mod, threshold_mod):
        monkeypatch.setattr(module, "choose_threshold", no_tuning, raising=False)
    got = evaluate(tiny_run, flipped, "test", tmp_path / "report", n_boot=N_BOOT)
    before = json.loads((test_report / "metrics.json").read_text())

    assert got["threshold"] == before["threshold"] == _meta(tiny_run)["threshold"]
    a, b = pd.read_csv(test_report / "predictions.csv"), pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert a["path"].tolist() == b["path"].tolist() and np.array_equal(a["score"], b["score"])
    assert (a["label"] != b["label"]).all()
    c, d = before["confusion"], got["confusion"]  # same calls, opposite truth
    assert (d["tp"], d["fp"], d["tn"], d["fn"]) == (c["fp"], c["tp"], c["fn"], c["tn"])
    assert got["sensitivity"]["value"] == pytest.approx(1 - before["specificity"]["value"])
    assert before["auc"]["value"] != pytest.approx(0.5, abs=0.05)  # so the flip below is seen
    assert got["auc"]["value"] == pytest.approx(1 - before["auc"]["value"])


@pytest.mark.slow
def test_split_all_says_what_it_leaves_out_and_scores_every_image_it_has_not_seen(tiny_run, tiny_data, xray_source,
                                                                                 tmp_path):
    """Through the CLI: on the run's own data grown by another source (ingest adds), `--split all` scores the new
    source and the run's test images, and prints how many train/validation images it left out and why."""
    assert "train and validation images are left out" in " ".join(run_cli("evaluate", "--help").stdout.split())
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (tmp_path / "new_src").mkdir()
    new = xray_source(tmp_path / "new_src", 10, seed=7, sources=("e", "e"))
    assert run_cli("ingest", str(new), "--out", str(data), "--size", "64", "--workers", "1").returncode == 0
    out = tmp_path / "report"

    result = run_cli("evaluate", str(tiny_run), "--data", str(data), "--split", "all", "--out", str(out),
                     "--n-boot", str(N_BOOT), "--no-diagnose")

    assert result.returncode == 0, result.stderr
    seen = _paths(tiny_run, "train", "val")
    note = f"note: {len(seen)} image(s) of {data} were used to train or validate this run and are left out"
    assert note in result.stderr
    pred = pd.read_csv(out / "predictions.csv")
    assert set(pred["path"]) == _paths(tiny_run, "test") | {str(new / f"img{i:03d}.png") for i in range(10)}


@pytest.mark.slow
def test_split_all_on_another_data_set_scores_every_image_through_the_cli(tiny_run, other_data, tmp_path):
    out = tmp_path / "external"

    result = run_cli("evaluate", str(tiny_run), "--data", str(other_data), "--split", "all", "--out", str(out),
                     "--n-boot", str(N_BOOT), "--no-diagnose")

    assert result.returncode == 0, result.stderr
    assert "left out" not in result.stderr
    manifest = pd.read_parquet(other_data / "manifest.parquet")
    assert sorted(pd.read_csv(out / "predictions.csv")["path"]) == sorted(manifest["path"])
