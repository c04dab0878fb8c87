"""The opt-in per-image member guard (out-of-distribution flags, measured by evaluate) and the shift alarm, on tiny
real runs and a site with a planted shift: in the run folder, in evaluate's report and in the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr.config import GateSettings, IngestConfig, TrainConfig
from covidcxr.data.ingest import ingest
from covidcxr.evaluation.evaluate import evaluate
from covidcxr.scoring import Scorer
from covidcxr.training.guarding import attach_guard
from covidcxr.training.trainer import train
from covidcxr.trust.guard import fit_guard
from covidcxr.trust.shift import (
    ShiftMonitor,
    alarm_power,
    batch_alpha,
    power_markdown,
    shift_test,
    stream_tests,
)


def planted_shift(root: Path, xray_source, n: int = 40, marks: bool = True, haze: float = 1.0) -> Path:
    """Toy X-rays of a new 'hospital' whose device leaves a bright haze over both lungs, a grid and strong noise.

    The toy model's calls move far from its validation share (the tiny ResNet of these tests calls about 5 % of them
    COVID-19 against about 40 % on validation: a wide, one-sided error); the grid and the noise (`marks`) are what
    make the images look unlike any it was trained on."""
    xray_source(root, n, seed=11, sources=("site", "site"))
    rng = np.random.default_rng(12)
    for png in sorted(root.glob("*.png")):
        img = np.asarray(Image.open(png), dtype=np.float32) / 255
        yy, xx = np.indices(img.shape) / np.array(img.shape)[:, None, None]
        fog = sum(np.exp(-(((xx - cx) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2)) for cx in (0.3, 0.7))
        grid = 0.15 * ((np.indices(img.shape) // 6).sum(0) % 2)
        noisy = img + haze * fog + (grid + rng.normal(0, 0.2, img.shape) if marks else rng.normal(0, 0.03, img.shape))
        Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8)).save(png)
    return root


def tiny_resnet(data: Path, out: Path, seed: int, epochs: int) -> Path:
    """A tiny ResNet-18 run from scratch: unlike a tiny AlexNet it learns in a few small batches."""
    return train(TrainConfig(data=str(data), out=str(out), arch="resnet18", weights="none", image_size=64,
                             epochs=epochs, batch_size=16, device="cpu", seed=seed, amp=False,
                             gate=GateSettings(enabled=False)))


@pytest.fixture(scope="module")
def guarded_run(tiny_data, tmp_path_factory) -> Path:
    """A run with a guard of two members (other seeds) and the density term."""
    root = tmp_path_factory.mktemp("guarded")
    members = [tiny_resnet(tiny_data, root / f"m{s}", s, 2) / "model.pt" for s in (1, 2)]
    run = tiny_resnet(tiny_data, root / "run", 0, 3)
    attach_guard(run, members, tiny_data, density=True)
    return run


@pytest.fixture(scope="module")
def shifted_site(xray_source, tmp_path_factory) -> Path:
    root = planted_shift(tmp_path_factory.mktemp("site_src"), xray_source)
    data = tmp_path_factory.mktemp("site_data")
    assert ingest([root], data, IngestConfig(size=64, workers=1)).kept == 40
    return data


@pytest.mark.slow
def test_guard_is_stored_with_the_run_and_accepts_most_validation_images(guarded_run):
    meta = json.loads((guarded_run / "guard.json").read_text())
    assert meta["members"] == ["member-0.pt", "member-1.pt"] and meta["density"] is True
    assert meta["info"]["stored_dtype"] == "bfloat16" and meta["info"]["stored_members_bytes"] > 0
    stored = sum((guarded_run / "guard" / m).stat().st_size for m in meta["members"])
    assert stored < 0.7 * 2 * (guarded_run / "model.pt").stat().st_size  # bf16 halves the members
    scorer = Scorer.from_run(guarded_run, "cpu", guard=True)
    assert len(scorer.members) == 2 and scorer.guard.threshold > 0


def test_fit_guard_accepts_the_chosen_share_of_its_reference():
    rng = np.random.default_rng(0)
    scores, members = rng.uniform(size=400), rng.uniform(size=(3, 400))
    guard = fit_guard(scores, members, ["a", "b", "c"], coverage=0.9)
    assert guard.in_distribution(guard.ood_scores(scores, members)).mean() == pytest.approx(0.9, abs=0.01)


@pytest.mark.slow
def test_planted_shift_is_flagged_and_the_alarm_fires(guarded_run, shifted_site, tmp_path):
    metrics = evaluate(guarded_run, shifted_site, "all", tmp_path / "report", n_boot=20, diagnostics=False)
    ood = metrics["ood"]
    assert ood["guard"] and ood["coverage"] <= 0.75, ood  # vs 95 % of validation images
    assert ood["shift"]["alarm"], ood["shift"]
    pred = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert {"in_distribution", "ood_score"} <= set(pred.columns)
    assert (pred["in_distribution"] == (pred["ood_score"] <= json.loads(
        (guarded_run / "guard.json").read_text())["threshold"])).all()
    assert "Shift alarm" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.slow
def test_in_distribution_test_split_is_accepted_and_silent(guarded_run, tiny_data, tmp_path):
    ood = evaluate(guarded_run, tiny_data, "test", tmp_path / "report", n_boot=20, diagnostics=False)["ood"]
    assert ood["coverage"] >= 0.7, ood
    assert not ood["shift"]["alarm"], ood["shift"]
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())["ood"]
    assert written["coverage"] == ood["coverage"] and "wrong_flagged" in written


def test_a_run_without_guard_claims_nothing(tiny_run, tiny_data, tmp_path):
    ood = evaluate(tiny_run, tiny_data, "test", tmp_path / "report", n_boot=20, diagnostics=False)["ood"]
    assert ood["guard"] is False and "shift" in ood
    assert "in_distribution" not in pd.read_csv(tmp_path / "report" / "predictions.csv").columns


def test_shift_test_fires_on_a_rate_gap_and_not_on_the_same_distribution():
    rng = np.random.default_rng(1)
    reference = rng.beta(2, 2, 300)  # about half above 0.5
    assert not shift_test(reference, rng.beta(2, 2, 300), 0.5)["alarm"]
    shifted = shift_test(reference, rng.beta(8, 1, 300), 0.5, "covid")
    assert shifted["alarm"] and shifted["p_rate"] < 1e-6
    assert "called covid here vs" in shifted["message"] and "not valid" in shifted["message"]
    assert not shift_test(reference, rng.beta(8, 1, 5), 0.5)["alarm"]  # too few images: no verdict


def test_shift_floor_holds_for_both_tests():
    """The KS test alone fires on a shift that leaves the rate at the threshold alone; a significant but small shift
    of a large batch stays below the floor."""
    rng = np.random.default_rng(2)
    reference = rng.beta(2, 2, 400)
    squeezed = 0.5 + (rng.beta(2, 2, 400) - 0.5) * 0.6  # same share above 0.5, scores nearer the threshold
    ks_only = shift_test(reference, squeezed, 0.5)
    assert ks_only["alarm"] and 0.15 <= ks_only["ks_statistic"] < 0.25 and ks_only["p_rate"] > 0.01  # like 2 folds
    assert "distributed unlike validation's" in ks_only["message"]
    large, nudged = rng.beta(2, 2, 20000), rng.beta(2.3, 2, 20000)
    small = shift_test(large, nudged, 0.5)
    assert small["p_ks"] < 1e-6 and small["ks_statistic"] < small["min_shift"] and not small["alarm"]


def test_shift_monitor_tests_each_full_batch_once():
    rng = np.random.default_rng(3)
    reference = rng.beta(2, 2, 500)
    monitor = ShiftMonitor(reference, threshold=0.5, batch=50)
    monitor.add(np.full(49, 0.99))
    assert monitor.status()["message"].startswith("no verdict yet") and monitor.status()["in_next_batch"] == 49
    monitor.add([0.99, 0.99])  # the batch of 50 is full: tested once; one score waits in the next
    status = monitor.status()
    assert status["alarm"] and status["n"] == 50 and status["in_next_batch"] == 1 and status["batches_tested"] == 1
    assert status["alpha"] == pytest.approx(0.05 / 6)
    monitor.add(rng.beta(2, 2, 49))  # the next batch: the waiting 0.99 and 49 like validation, silent
    status = monitor.status()
    assert not status["alarm"] and (status["batches_tested"], status["batches_alarmed"]) == (2, 1)
    assert status["in_next_batch"] == 0


def test_batch_alpha_spreads_five_percent_over_300_predictions():
    assert [batch_alpha(n) for n in (25, 50, 100, 200, 300, 500)] == pytest.approx(
        [0.05 / 12, 0.05 / 6, 0.05 / 3, 0.05 / 2, 0.05, 0.05])


@pytest.mark.slow
def test_streams_like_validation_rarely_alarm_and_a_switch_is_caught():
    """300 predictions like the validation split's raise a false alarm in at most ~5 % of streams (each against its
    own validation split: the stated rate), at every batch size; a switch to shifted scores at prediction 300 is
    caught within 100 predictions at n = 50 and 100."""
    rng = np.random.default_rng(4)
    for batch in (25, 50, 100, 200):
        false = [any(t["alarm"] for t in stream_tests(rng.beta(2, 2, 500), rng.beta(2, 2, 300), 0.5, batch))
                 for _ in range(150)]
        assert np.mean(false) <= 0.09, (batch, np.mean(false))  # 5 % stated; 150 streams give +-3.5 %
    reference = rng.beta(2, 2, 500)
    for batch in (50, 100):
        stream = np.r_[rng.beta(2, 2, 300), rng.beta(5, 1.5, 100)]
        fired = [t["start"] + batch for t in stream_tests(reference, stream, 0.5, batch) if t["alarm"]]
        assert fired and 300 < fired[0] <= 400, (batch, fired)


@pytest.mark.slow
def test_alarm_power_on_synthetic_scores():
    rng = np.random.default_rng(5)
    reference, own = rng.beta(2, 2, 400), rng.beta(2, 2, 400)
    held = {"far": rng.beta(6, 1, 300), "subtle": rng.beta(2.3, 2, 300), "small": rng.beta(6, 1, 30)}
    table = alarm_power(reference, 0.5, own, held, batches=100, seed=0)
    assert [row["n"] for row in table] == [25, 50, 100, 200]
    for row in table:
        fa = row["false_alarm"]
        assert fa["n"] == 100 and fa["value"] <= 0.1 and fa["ci95"][0] <= fa["value"] <= fa["ci95"][1]
        assert row["alpha"] == pytest.approx(batch_alpha(row["n"]))
    far = [row["detection"]["far"]["value"] for row in table]
    subtle = [row["detection"]["subtle"]["value"] for row in table]
    assert far[2] >= 0.9 and far == sorted(far)  # a far shift: found at n = 100, more often with more images
    assert all(s < f for s, f in zip(subtle, far)) and subtle[0] < 0.2  # a subtle one: rarely at small n
    assert table[0]["detection"]["small"] is not None and table[2]["detection"]["small"] is None  # 30 < 100 images
    lines = power_markdown(table).splitlines()
    assert lines[0] == ("| n | alpha | false alarms (own test split) | detected: far | detected: subtle "
                        "| detected: small |")
    assert lines[4].startswith("| 100 | 0.0167 | ") and lines[4].endswith(" | n/a |") and len(lines) == 6


def test_power_of_a_run_that_holds_nothing_out_measures_its_false_alarms_alone(tmp_path, monkeypatch):
    """The main run's row: false alarms per n and silence over the first 300 predictions; no detection, no switch."""
    from covidcxr.hospital import shiftpower
    from covidcxr.hospital.shiftpower import fold_power, write_alarm

    monkeypatch.setattr(shiftpower, "POWER_BATCHES", 100)  # the figures' precision is not what is tested (time)
    monkeypatch.setattr(shiftpower, "STREAMS", 40)
    rng = np.random.default_rng(2)

    def frame(a: float, b: float, n: int) -> pd.DataFrame:
        return pd.DataFrame({"y": (rng.random(n) < 0.5).astype(int), "score": rng.beta(a, b, n)})

    main = fold_power("none (main run)", rng.beta(2, 2, 400), 0.5, frame(2, 2, 400), None)
    fold = fold_power("far", rng.beta(2, 2, 400), 0.5, frame(2, 2, 400), frame(6, 1, 300))
    assert main["ba_site"] is None and main["stream"]["alarm_within_batch"] is None
    assert all(row["detection"] == {} and row["false_alarm"]["value"] <= 0.1 for row in main["power"])
    assert main["stream"]["silent_before"]["value"] >= 0.9
    text = write_alarm(tmp_path, [main, fold])
    power, streams = pd.read_csv(tmp_path / "alarm_power.csv"), pd.read_csv(tmp_path / "alarm_stream.csv")
    assert power.loc[power["held_out"] == "none (main run)", "detection"].isna().all()
    assert power.loc[power["held_out"] == "far", "detection"].notna().all()
    assert streams["alarm_within_batch"].isna().tolist() == [True, False]
    assert "| none (main run) | 0.9" in text and " | n/a | n/a |" in text
    assert "Highest false-alarm rate on own-split batches at any n: none (main run) " in text and "; far " in text


def test_streams_draw_a_small_split_in_passes_with_no_film_twice_before_all_have_come():
    """A split smaller than a stream is drawn in successive permutations: drawn with replacement, a batch of 100 of
    258 films would vary 39 % more than fresh films and the alarm would read that as a shift."""
    from covidcxr.hospital.shiftpower import passes

    pool = np.arange(258.0)
    stream = passes(np.random.default_rng(0), pool, 600)
    assert len(stream) == 600 and sorted(stream[:258]) == pool.tolist() and sorted(stream[258:516]) == pool.tolist()
    assert len(set(stream[516:])) == 84  # the third pass has begun: still no repeats within it
    assert len(set(passes(np.random.default_rng(1), pool, 100))) == 100


def test_a_batch_drawn_in_passes_from_a_split_varies_as_fresh_films_would():
    """The reason for drawing in passes: over many splits of 258 films from one law, a batch of 100 drawn without
    replacement strays from the law's mean as a batch of fresh films does, one drawn with replacement 39 % more."""
    from covidcxr.hospital.shiftpower import passes

    rng = np.random.default_rng(0)
    strays: dict[str, list[float]] = {"passes": [], "with replacement": [], "fresh": []}
    for _ in range(4000):
        split = rng.normal(size=258)
        strays["passes"].append(passes(rng, split, 100).mean())
        strays["with replacement"].append(rng.choice(split, 100).mean())
        strays["fresh"].append(rng.normal(size=100).mean())
    variance = {k: float(np.mean(np.square(v))) for k, v in strays.items()}  # around the law's mean, 0
    assert 0.9 < variance["passes"] / variance["fresh"] < 1.1
    assert 1.25 < variance["with replacement"] / variance["fresh"] < 1.55  # 1 + 100 / 258


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_the_service_raises_the_shift_alarm(guarded_run, xray_source, tmp_path, engine):
    """After a shifted batch /api/health carries the alarm that the page shows. On either engine the service gives
    covidcxr's answers, and neither carries the opt-in member guard: it is a measurement for evaluate, not a
    per-request cost."""
    from fastapi.testclient import TestClient

    from covidcxr.config import ServeConfig
    from covidcxr.deploy.predict import Predictor
    from covidcxr.deploy.serve.app import create_app
    from covidcxr.deploy.serve.server import load_predictor

    planted = sorted(planted_shift(tmp_path, xray_source, n=40).glob("*.png"))
    predictor = Predictor.from_run(guarded_run)  # the torch engine itself; load_predictor would set torch's threads
    served = predictor if engine == "torch" else load_predictor(guarded_run, engine, threads=1)
    tolerance = 1e-5 if engine == "torch" else 1e-4  # torch: float32 sums differ with the batch a film is in
    cfg = ServeConfig(db=str(tmp_path / "log.sqlite"), shift_batch=40)
    with TestClient(create_app(served, cfg)) as client:
        assert client.get("/api/health").json()["shift"]["alarm"] is False  # nothing scored yet: no verdict
        answers = [client.post("/api/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
                   for p in planted]
        health = client.get("/api/health").json()
    expected = {Path(r.path).name: r for r in predictor.predict_paths(planted)}
    for path, got in zip(planted, answers):
        want = expected[path.name]
        assert got["probability"] == pytest.approx(want.probability, abs=tolerance)
        assert got["label"] == want.label and "in_distribution" not in got
    assert health["shift"]["alarm"] is True and "probably not valid" in health["shift"]["message"]
