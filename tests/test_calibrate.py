"""`covidcxr calibrate`: it adapts a run only where patient-grouped cross-validation shows a gain beyond its noise,
keeps the original (and says so) elsewhere, refuses sites too small to measure, and sets triage thresholds.

The sites are toy X-rays labelled from the run's own scores, so what adapting can achieve is known: labels cut at
another score than the run's threshold make a shifted site the threshold can fix; coin-flip labels make a site nothing
can fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from covidcxr.config import IngestConfig
from covidcxr.data.ingest import ingest
from covidcxr.deploy.predict import Predictor

pytestmark = pytest.mark.slow  # trains the shared tiny run, runs `covidcxr calibrate` in a subprocess


def ingested(root: Path, out: Path) -> Path:
    ingest([root], out, IngestConfig(size=64, workers=1))
    return out


def scored_site(root: Path, run: Path, xray_source, n: int, label) -> Path:
    """An ingested site of n toy X-rays whose labels are `label(scores, threshold)` (True: covid)."""
    (root / "src").mkdir(parents=True)
    src = xray_source(root / "src", n, seed=31, sources=("site", "site"))
    meta = pd.read_csv(src / "metadata.csv")
    predictor = Predictor.from_run(run)
    scores = np.array([p.probability for p in predictor.predict_paths([src / p for p in meta["path"]])])
    meta["label"] = np.where(label(scores, predictor.threshold), "covid", "normal")
    meta.to_csv(src / "metadata.csv", index=False)
    return ingested(src, root / "data")


def calibrate(run: Path, site: Path, out: Path, *flags: str):
    return run_cli("calibrate", str(run), "--data", str(site), "--out", str(out), "--fraction", "0.5",
                   "--n-boot", "200", *flags)


def shifted_labels(scores: np.ndarray, threshold: float) -> np.ndarray:
    """COVID-19 above a cut far from the run's threshold: the run ranks this site perfectly but calls it wrongly."""
    at = float((scores < threshold).mean())  # where the run's threshold falls among the site's scores
    return scores >= np.quantile(scores, 0.2 if at > 0.5 else 0.8)


@pytest.fixture(scope="module")
def shifted(tiny_run, xray_source, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("shifted")
    site = scored_site(tmp, tiny_run, xray_source, 160, shifted_labels)  # 20+ of each class to calibrate on
    r = calibrate(tiny_run, site, tmp / "out", "--triage", "--npv", "0.8", "--ppv", "0.8", "--confidence", "0.8",
                  "--min-sensitivity", "0.6", "--min-specificity", "0.6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("adapted (") and "held-back part: sensitivity" in r.stdout
    return tmp / "out"


def test_a_shifted_site_where_adapting_helps_is_adapted(shifted):
    record = json.loads((shifted / "calibration.json").read_text())
    assert record["choice"] in ("threshold", "temperature")  # fine-tuning needs more images than this site has
    chosen = record["candidates"][record["choice"]]
    assert chosen["gain"] > chosen["gain_lower"] > 0  # beats "nothing" on cross-validation beyond its noise
    assert set(record["candidates"]) == {"nothing", "threshold", "temperature"} and "fine-tuning" in record["not_tried"]
    assert record["threshold_method"] == "requirements"  # aimed at the site's requirements by default
    assert record["settings"]["min_sensitivity"] == 0.6 and record["settings"]["min_specificity"] == 0.6
    verdicts = [json.loads((shifted / p / "validation.json").read_text())["requirements"] for p in ("before", "after")]
    assert all(v["min_sensitivity"] == 0.6 and v["min_specificity"] == 0.6 for v in verdicts)  # the same bar
    before = json.loads((shifted / "before" / "validation.json").read_text())["metrics"]
    after = json.loads((shifted / "after" / "validation.json").read_text())["metrics"]
    assert before["n"] == after["n"] >= 10  # the same held-back images
    assert after["balanced_accuracy"]["value"] > before["balanced_accuracy"]["value"] + 0.1, (before, after)
    held = set(pd.read_csv(shifted / "after" / "predictions.csv")["path"])
    assert held == set(record["images"]["held-back"]) and not held & set(record["images"]["calibration"])
    reference = pd.read_csv(shifted / "run" / "val_predictions.csv")
    assert set(record["images"]["calibration"]) <= set(reference["path"])  # the shift reference includes the site


def test_the_adapted_run_carries_its_triage_classes(shifted, tiny_run, xray_source, tmp_path):
    triage = json.loads((shifted / "run" / "triage.json").read_text())
    assert triage["npv"] == 0.8 and "Learn-then-Test" in triage["method"]
    assert triage["rule_out_max"] is not None or triage["rule_in_min"] is not None
    report = json.loads((shifted / "after" / "validation.json").read_text())["triage"]
    shares = sum(report[c]["share"] for c in ("rule-out", "rule-in", "needs a reader"))
    assert shares == pytest.approx(1.0) and report["n"] >= 10
    r = run_cli("predict", str(shifted / "run"), str(xray_source(tmp_path, 6, seed=4)), "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["triage"] for row in rows} <= {"rule-out", "rule-in", "needs a reader"}
    for row in rows:  # the class follows the stored thresholds
        if triage["rule_in_min"] is not None and row["probability"] >= triage["rule_in_min"]:
            assert row["triage"] == "rule-in"
    original = run_cli("predict", str(tiny_run), str(tmp_path), "--format", "json")
    assert all(row["triage"] is None for row in json.loads(original.stdout))  # no thresholds, no class


def test_a_site_where_adapting_cannot_help_keeps_the_original_and_says_so(tiny_run, xray_source, tmp_path):
    coin = np.random.default_rng(3)
    site = scored_site(tmp_path, tiny_run, xray_source, 80, lambda s, t: coin.uniform(size=len(s)) < 0.5)
    r = calibrate(tiny_run, site, tmp_path / "out", "--lr", "0.002")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("kept the original model: no adaptation beat it on patient-grouped cross-validation")
    record = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert record["settings"]["lr"] == 0.002  # the flag reaches the settings saved with the result
    assert record["choice"] == "nothing" and all(c["gain_lower"] <= 0 for c in record["candidates"].values())
    assert (tmp_path / "out" / "run" / "model.pt").read_bytes() == (tiny_run / "model.pt").read_bytes()
    before = json.loads((tmp_path / "out" / "before" / "metrics.json").read_text())
    after = json.loads((tmp_path / "out" / "after" / "metrics.json").read_text())
    assert before["confusion"] == after["confusion"]


def test_too_few_images_for_a_threshold_keep_the_original_threshold(tiny_run, xray_source, tmp_path):
    site = scored_site(tmp_path, tiny_run, xray_source, 30, shifted_labels)
    r = calibrate(tiny_run, site, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("kept the original model: choosing a threshold needs at least 10 calibration images "
                               "of each class (there are ")
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["candidates"].keys() == {"nothing"}


def test_a_site_whose_calibration_images_lack_a_class_keeps_the_original(tiny_run, xray_source, tmp_path):
    """A site with 3 normal films among 40: the calibration images hold too few of them to choose anything, so nothing
    is cross-validated or fitted and the original stays."""
    site = scored_site(tmp_path, tiny_run, xray_source, 40, lambda s, t: np.arange(len(s)) >= 3)
    r = calibrate(tiny_run, site, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("kept the original model: choosing a threshold needs at least 10")
    record = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert record["choice"] == "nothing" and record["candidates"]["nothing"]["folds"] == 0


def test_too_few_images_for_triage_are_refused_with_the_number_needed(tiny_run, xray_source, tmp_path):
    site = scored_site(tmp_path, tiny_run, xray_source, 40, shifted_labels)
    r = calibrate(tiny_run, site, tmp_path / "out", "--triage", "--npv", "0.99")
    assert r.returncode == 2, r.stdout
    assert "too few labelled images for triage" in r.stderr and "at least 300 negative and 30 positive" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_with_triage_fine_tuning_is_not_tried(tiny_run, xray_source, tmp_path):
    """Triage thresholds need scores of the final weights on images they never trained on; fine-tuned weights train
    on every calibration image, so with --triage only the candidates that keep the weights are tried, and the line
    says why."""
    median = lambda s, t: s >= np.median(s)  # noqa: E731
    site = scored_site(tmp_path, tiny_run, xray_source, 120, median)
    r = calibrate(tiny_run, site, tmp_path / "out", "--triage", "--npv", "0.8", "--ppv", "0.8")
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert set(record["candidates"]) == {"nothing", "threshold", "temperature"}
    assert "fine-tuning is not tried with triage" in record["not_tried"]
    assert record["triage"]["n_calibration"] == record["counts"]["calibration"]  # set on all of them


def test_fine_tuned_weights_train_on_every_calibration_image_and_keep_out_of_fold_scores(shifted, tiny_run,
                                                                                        tmp_path):
    """A fine-tuning candidate is cross-fitted: its final weights train on all the calibration images, and its
    temperature, threshold and shift reference come from the cross-validation's out-of-fold scores, not from scores
    of images the weights trained on."""
    from covidcxr.data.cache import ImageCache
    from covidcxr.scoring import Scorer

    site = shifted.parent / "data"
    r = calibrate(tiny_run, site, tmp_path / "out", "--candidates", "nothing,head")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("adapted (the head fine-tuned, temperature and threshold)"), r.stdout
    record = json.loads((tmp_path / "out" / "calibration.json").read_text())
    # the ranking holds; the threshold is not judged here: this barely trained run's scores spread over 1e-4, and
    # fine-tuning moves them by as much, so a cut set on the folds' scores lands anywhere on the final weights'
    assert record["after_auc"] >= record["before_auc"] - 0.02, record["summary"]
    calibration = set(record["images"]["calibration"])
    split = pd.read_csv(tmp_path / "out" / "run" / "split.csv")
    assert set(split.loc[split["split"] == "train", "path"]) >= calibration  # trained on every one
    assert not set(split.loc[split["split"] == "val", "path"]) & calibration
    reference = pd.read_csv(tmp_path / "out" / "run" / "val_predictions.csv")
    rows = reference[reference["path"].isin(calibration)]
    cache = ImageCache(site)
    manifest = cache.manifest().set_index("path")
    in_sample = Scorer.from_run(tmp_path / "out" / "run", "cpu").scores(
        cache.load(manifest.loc[rows["path"], "cache_index"]).numpy())
    assert len(rows) == len(calibration) and not np.allclose(rows["score"], in_sample, rtol=0, atol=1e-6)


def test_one_class_site_is_refused(tiny_run, xray_source, tmp_path):
    (tmp_path / "src").mkdir()
    root = xray_source(tmp_path / "src", 30, seed=7)
    meta = pd.read_csv(root / "metadata.csv").assign(label="covid")
    meta.to_csv(root / "metadata.csv", index=False)
    r = run_cli("calibrate", str(tiny_run), "--data", str(ingested(root, tmp_path / "data")),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "one class only (covid)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_too_small_site_is_refused_with_the_number_it_needs(tiny_run, xray_source, tmp_path):
    (tmp_path / "src").mkdir()
    root = xray_source(tmp_path / "src", 8, seed=8)
    r = run_cli("calibrate", str(tiny_run), "--data", str(ingested(root, tmp_path / "data")),
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "too few images to calibrate" in r.stderr and "(needs 10;" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_fine_tuning_gives_the_same_weights_whatever_ran_before(tiny_run):
    """Dropout draws from torch's global generator: fine-tuning seeds it, so a candidate's weights do not depend on
    which candidates (or anything else) drew from it earlier in the process."""
    import copy

    import torch

    from covidcxr.config import CalibrateSettings
    from covidcxr.hospital.calibrate import finetune
    from covidcxr.scoring import Scorer

    scorer = Scorer.from_run(tiny_run, "cpu")
    size = scorer.spec.preprocess.cache_size
    rng = np.random.default_rng(0)
    x = scorer.normalise(rng.integers(0, 256, (12, size, size), dtype=np.uint8))
    y = torch.tensor(rng.integers(0, 2, 12))
    settings = CalibrateSettings(finetune_epochs=1, batch_size=4)
    weights = []
    for before in (1, 2):
        torch.manual_seed(before)  # a different global state each time
        tuned = copy.deepcopy(scorer)
        finetune(tuned, x, y, "all", settings)
        weights.append(tuned.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], v) for k, v in scorer.model.state_dict().items())  # it did train
