"""The gate: only frontal chest radiographs are scored; everything else is refused with a reason, through predict,
evaluate, the service and ingest (the PACS path: tests/test_pacs.py; the page: tests/test_browser.py). The shared
tiny run's gate was fitted on toy films; the real-data test fits one on ../shared/cxr with ../shared/cxr-nonfrontal's
lateral films and CT slices."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import run_cli, shared_cxr_path, xray
from covidcxr.trust.gate import BLANK_STD, NOISE_ROUGHNESS, REASONS, roughness, rule_kinds
from covidcxr.trust.negatives import thumbnail

TURNS = {"rotated_cw": -1, "rotated_180": 2, "rotated_ccw": 1}  # np.rot90's k of each refusal kind


def toy_film(seed: int = 7) -> np.ndarray:
    return xray(np.random.default_rng(seed), covid=True)


def page(seed: int = 0) -> np.ndarray:
    """A page of text, written here (not the gate's own generator)."""
    rng = np.random.default_rng(seed)
    im = Image.new("L", (420, 560), 250)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=15)
    for y in range(20, 540, 22):
        draw.text((24, y), " ".join("lorem ipsum dolor sit amet".split()[i % 5] for i in rng.integers(0, 5, 7)),
                  fill=20, font=font)
    return np.asarray(im, dtype=np.float32) / 255


def photograph() -> np.ndarray:
    """A photograph that scikit-image ships (the coffee cup), in gray."""
    from skimage import data
    return np.asarray(Image.fromarray(data.coffee()).convert("L"), dtype=np.float32) / 255


def save(folder: Path, images: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in images.items():
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def refusal_set(folder: Path) -> Path:
    """One upright toy film, the same film turned three ways and inverted, a page, a photograph, a blank and a noise
    image; each file is named after what the gate should answer."""
    film = toy_film()
    images = {"frontal": film, "inverted": 1 - film, "document": page(), "photograph": photograph(),
              "blank_or_noise": np.full((300, 260), 0.4), "noise": np.random.default_rng(0).random((256, 256))}
    images.update({kind: np.rot90(film, k) for kind, k in TURNS.items()})
    return save(folder, images)


def expected_reason(name: str) -> str:
    return REASONS["blank_or_noise" if name == "noise" else name]


def test_rules_refuse_blank_and_noise_and_let_films_through():
    film = (toy_film() * 255).astype(np.uint8)
    blank = np.full_like(film, 120)
    noise = np.random.default_rng(0).integers(0, 256, film.shape).astype(np.uint8)
    squares = np.stack([film, blank, noise])
    thumbs = np.stack([thumbnail(s) for s in squares])
    assert thumbs[1].std() < BLANK_STD and roughness(thumbs[2:])[0] > NOISE_ROUGHNESS > roughness(thumbs[:1])[0]
    assert rule_kinds(thumbs) == [None, "blank_or_noise", "blank_or_noise"]


@pytest.mark.slow
def test_predict_refuses_each_kind_with_its_reason_and_scores_the_film_upright(tiny_run, tmp_path):
    folder = refusal_set(tmp_path / "in")
    result = run_cli("predict", str(tiny_run), str(folder), "--format", "csv")
    assert result.returncode == 1, result.stderr  # some inputs were not scored, and each is listed
    rows = pd.read_csv(pd.io.common.StringIO(result.stdout)).set_index("path")
    for path, row in rows.iterrows():
        name = Path(str(path)).stem
        if name == "frontal":
            assert row["status"] == "scored" and 0 <= row["probability"] <= 1 and row["label"] in ("covid", "normal")
        else:
            assert row["status"] == "refused" and row["reason"] == expected_reason(name), (name, row["reason"])
            assert pd.isna(row["probability"]) and pd.isna(row["label"])  # no score on what it was not built for
            assert f"refused {path}: {row['reason']}" in result.stderr
    assert "turn it 90 degrees counter-clockwise (upright) and send it again" in rows.filter(
        like="rotated_cw", axis=0)["reason"].iloc[0]
    table = run_cli("predict", str(tiny_run), str(folder / "rotated_180.png"), str(folder / "frontal.png")).stdout
    assert "REFUSED" in table and REASONS["rotated_180"] in table


@pytest.mark.slow
def test_the_service_answers_422_with_the_reason_and_monitor_counts_refusals_by_reason(tiny_run, tmp_path):
    """The answer names the file; the log keeps the bare reason (the file name has its own column), so that `monitor`
    counts the blank and the noise image under one reason."""
    from collections import Counter

    from fastapi.testclient import TestClient

    from covidcxr.config import MonitorConfig, ServeConfig
    from covidcxr.deploy.loop.monitor import monitor, read_log
    from covidcxr.deploy.predict import Predictor
    from covidcxr.deploy.serve.app import create_app

    folder = refusal_set(tmp_path / "in")
    cfg = ServeConfig(db=str(tmp_path / "log.sqlite"))
    with TestClient(create_app(Predictor.from_run(tiny_run), cfg)) as client:
        for png in sorted(folder.glob("*.png")):
            answer = client.post("/api/predict", files={"file": (png.name, png.read_bytes(), "image/png")})
            if png.stem == "frontal":
                assert answer.status_code == 200 and 0 <= answer.json()["probability"] <= 1
            else:
                assert answer.status_code == 422, png.stem
                assert answer.json()["detail"] == f"{png.name}: refused: {expected_reason(png.stem)}"
    refused = monitor(*read_log(cfg.db), MonitorConfig(window="100"))["windows"][0]["refused"]
    names = [p.stem for p in folder.glob("*.png") if p.stem != "frontal"]
    assert refused == Counter(f"refused: {expected_reason(name)}" for name in names)
    assert refused[f"refused: {REASONS['blank_or_noise']}"] == 2


@pytest.mark.slow
def test_evaluate_counts_refusals_and_scores_the_rest(tiny_run, xray_source, tmp_path):
    """A site folder with some films turned on their side: they are listed as refused, counted by reason in
    metrics.json and the report, and every metric is over the scored films only."""
    (tmp_path / "site").mkdir()
    site = xray_source(tmp_path / "site", 24, seed=5)
    for png in sorted(site.glob("*.png"))[:5]:
        Image.fromarray(np.rot90(np.asarray(Image.open(png)), -1)).save(png)
    assert run_cli("ingest", str(site), "--out", str(tmp_path / "data"), "--size", "64").returncode == 0
    result = run_cli("evaluate", str(tiny_run), "--data", str(tmp_path / "data"), "--split", "all", "--out",
                     str(tmp_path / "report"), "--n-boot", "20", "--no-diagnose")
    assert result.returncode == 0, result.stderr
    pred = pd.read_csv(tmp_path / "report" / "predictions.csv")
    refused = pred[pred["status"] == "refused"]
    assert set(refused["path"].str[-10:]) >= {f"img{i:03d}.png" for i in range(5)} and len(refused) <= 7
    assert refused["score"].isna().all() and refused["pred"].isna().all()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n"] == len(pred) - len(refused) and metrics["n_refused"] == len(refused)
    assert metrics["refused"][REASONS["rotated_cw"]] >= 5
    assert f"{len(refused)} image(s) refused by the gate" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.slow
def test_ingest_with_a_gate_leaves_refused_files_out_unless_kept(tiny_run, xray_source, tmp_path):
    (tmp_path / "site").mkdir()
    site = xray_source(tmp_path / "site", 8, seed=6)
    save(site, {"page": page(), "blank": np.full((200, 200), 0.5)})
    pd.concat([pd.read_csv(site / "metadata.csv"),
               pd.DataFrame({"path": ["page.png", "blank.png"], "label": ["normal", "normal"],
                             "patient_id": ["q1", "q2"], "source": ["a", "a"]})]).to_csv(site / "metadata.csv",
                                                                                       index=False)
    result = run_cli("ingest", str(site), "--out", str(tmp_path / "data"), "--size", "64", "--gate", str(tiny_run))
    assert result.returncode == 1 and "refused 2 file(s)" in result.stdout, result.stdout + result.stderr
    report = json.loads((tmp_path / "data" / "ingest_report.json").read_text())
    assert {Path(r["path"]).name: r["reason"] for r in report["refused"]} == {
        "page.png": REASONS["document"], "blank.png": REASONS["blank_or_noise"]}
    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    assert len(manifest) == 8 and not manifest["path"].str.contains("page|blank").any()
    kept = run_cli("ingest", str(site), "--out", str(tmp_path / "kept"), "--size", "64", "--gate", str(tiny_run),
                   "--keep-refused")
    assert "2 kept: --keep-refused" in kept.stdout
    assert len(pd.read_parquet(tmp_path / "kept" / "manifest.parquet")) == 10


def test_runs_without_a_gate_trained_alike_are_said_so_once(tmp_path, caplog):
    """An original run and calibrate's copies of it (which keep its settings digest) share one line; a run trained
    with other settings gets its own."""
    from covidcxr.trust.gate import load_gate

    runs = {"original": "digest-a", "copy": "digest-a", "other": "digest-b"}
    for name in runs:
        (tmp_path / name).mkdir()
    with caplog.at_level(logging.WARNING, logger="covidcxr.trust.gate"):
        assert all(load_gate(tmp_path / name, trained_as=runs[name]) is None
                   for name in ("original", "copy", "other", "copy"))
    said = [r.getMessage() for r in caplog.records if "has no gate" in r.getMessage()]
    assert len(said) == 2 and "original" in said[0] and "other" in said[1]


@pytest.mark.slow
def test_a_run_without_a_gate_says_so_and_scores_everything(tiny_data, tmp_path):
    run = tmp_path / "run"
    trained = run_cli("train", "--no-gate", str(tiny_data), "--out", str(run), "--weights", "none", "--epochs", "1",
                      "--image-size", "64", "--device", "cpu")
    assert trained.returncode == 0 and not (run / "gate.json").exists(), trained.stderr
    assert json.loads((run / "config.json").read_text())["gate"]["enabled"] is False
    folder = refusal_set(tmp_path / "in")
    result = run_cli("predict", str(run), str(folder), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in json.loads(result.stdout)} == {"scored"}
    assert sum("has no gate" in line for line in result.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def real_gate_run(tmp_path_factory):
    """A run on 300 real films of ../shared/cxr (64 px, one short epoch) whose gate was also shown the lateral films
    and CT slices of half of ../shared/cxr-nonfrontal's patients; the other half is kept to test it."""
    cxr = shared_cxr_path()
    nonfrontal = cxr.parent / "cxr-nonfrontal"
    if not (cxr / "metadata.csv").is_file() or not (nonfrontal / "metadata.csv").is_file():
        pytest.skip("../shared/cxr and ../shared/cxr-nonfrontal are not here")
    root = tmp_path_factory.mktemp("real_gate")
    meta = pd.read_csv(cxr / "metadata.csv")
    meta = meta[meta["label"].isin(["covid", "normal"])].groupby("source").head(45)
    meta.assign(path=[os.path.relpath(cxr / p, root) for p in meta["path"]]).to_csv(root / "metadata.csv", index=False)
    nf = pd.read_csv(nonfrontal / "metadata.csv")
    shown = nf["patient_id"].isin(sorted(nf["patient_id"].unique())[::2])
    (root / "neg").mkdir()
    nf[shown].assign(path=[os.path.relpath(nonfrontal / p, root / "neg") for p in nf.loc[shown, "path"]]).to_csv(
        root / "neg" / "metadata.csv", index=False)
    assert run_cli("ingest", str(root), "--out", str(root / "data"), "--size", "128").returncode == 0
    result = run_cli("train", str(root / "data"), "--out", str(root / "run"), "--weights", "none", "--epochs", "1",
                     "--image-size", "64", "--device", "cpu", "--gate-negatives", str(root / "neg"))
    assert result.returncode == 0, result.stderr
    return root / "run", [nonfrontal / p for p in nf.loc[~shown, "path"]], [cxr / p for p in meta["path"][:6]]


@pytest.mark.slow
def test_a_gate_fitted_on_real_films_refuses_unseen_laterals_and_ct_and_turned_films(real_gate_run, tmp_path):
    run, unseen, films = real_gate_run
    info = json.loads((run / "gate.json").read_text())
    assert info["kinds_not_shown"] == [] and info["validation_accepted"] >= 0.95
    turned = save(tmp_path / "turned", {f"{kind}_{i}": np.rot90(np.asarray(Image.open(f).convert("L")) / 255, k)
                                        for i, f in enumerate(films[:3]) for kind, k in TURNS.items()})
    save(turned, {f"inverted_{i}": 1 - np.asarray(Image.open(f).convert("L")) / 255 for i, f in enumerate(films[:3])})
    result = run_cli("predict", str(run), *map(str, unseen), str(turned), *map(str, films), "--format", "json")
    rows = {Path(r["path"]): r for r in json.loads(result.stdout)}
    assert all(rows[f]["status"] == "scored" for f in films), [rows[f] for f in films]
    for path in turned.glob("*.png"):
        assert rows[path]["reason"] == REASONS[path.stem.rsplit("_", 1)[0]], (path.name, rows[path])
    refused = [rows[p]["status"] == "refused" for p in unseen]
    assert np.mean(refused) >= 0.8, [(p.name, rows[p]["reason"]) for p in unseen]
    kinds = {rows[p]["reason"] for p in unseen if "lateral" in str(p)}
    assert REASONS["lateral"] in kinds


@pytest.mark.slow
def test_the_service_refuses_real_lateral_films_and_ct_slices(real_gate_run, tmp_path):
    from fastapi.testclient import TestClient

    from covidcxr.config import ServeConfig
    from covidcxr.deploy.predict import Predictor
    from covidcxr.deploy.serve.app import create_app

    run, unseen, films = real_gate_run
    lateral = next(p for p in unseen if "/lateral/" in str(p))
    ct = next(p for p in unseen if "/ct/" in str(p))
    with TestClient(create_app(Predictor.from_run(run), ServeConfig(db=str(tmp_path / "log.sqlite")))) as client:
        answers = {p: client.post("/api/predict", files={"file": (p.name, p.read_bytes(), "image/png")})
                   for p in (lateral, ct, films[0])}
    assert answers[films[0]].status_code == 200
    for path in (lateral, ct):
        assert answers[path].status_code == 422 and answers[path].json()["detail"].startswith(f"{path.name}: refused")
