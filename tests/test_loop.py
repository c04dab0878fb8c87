"""The loop at a site: readers' verdicts through the service and from a CSV, the images kept and exported as a data set
that evaluate and calibrate accept, and `covidcxr monitor` over a log with a planted shift and a planted rise in the
readers' disagreement."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from conftest import run_cli, xray
from covidcxr.config import ServeConfig
from covidcxr.config.monitor import IN_CONTROL_RUN
from covidcxr.deploy.serve.app import create_app
from covidcxr.deploy.serve.log import PredictionLog
from servers import benchmark

TOKEN = "loop-test-token"


def bench_monitor():
    """benchmarks/bench_monitor.py as a module: its synthetic log is what these tests monitor."""
    return benchmark("bench_monitor")


def _post(client: TestClient, path: Path, **params) -> dict:
    res = client.post("/api/predict", params=params, files={"file": (path.name, path.read_bytes(), "image/png")})
    assert res.status_code == 200, res.text
    return res.json()


@pytest.fixture
def toy_images(xray_source, tmp_path) -> list[Path]:
    root = tmp_path / "src"
    root.mkdir()
    return sorted(xray_source(root, 16, seed=21).glob("*.png"))


def test_verdicts_through_the_api_keep_their_history(predictor, toy_images, tmp_path) -> None:
    db = tmp_path / "log.sqlite"
    with TestClient(create_app(predictor, ServeConfig(db=str(db)))) as client:
        answer = _post(client, toy_images[0])
        pid = answer["prediction_id"]
        assert _post(client, toy_images[1])["prediction_id"] == pid + 1
        first = client.post("/api/feedback", json={"prediction_id": pid, "label": "covid", "reader": "dr a"})
        assert first.status_code == 200, first.text
        assert first.json() | {"verdict_id": 0} == {"verdict_id": 0, "prediction_id": pid, "label": "covid",
                                                    "history": 1}
        again = client.post("/api/feedback", json={"prediction_id": pid, "label": "normal", "reader": "dr b",
                                                   "comment": "on second look"}).json()
        assert again["history"] == 2 and again["verdict_id"] > first.json()["verdict_id"]
        unknown = client.post("/api/feedback", json={"prediction_id": 999, "label": "covid"})
        assert unknown.status_code == 404 and "999" in unknown.json()["detail"]
        bad = client.post("/api/feedback", json={"prediction_id": pid, "label": "maybe"})
        assert bad.status_code == 422 and "covid, normal, pneumonia, other" in bad.json()["detail"]
    history = PredictionLog(db).verdicts(pid)
    assert [(v["label"], v["reader"], v["comment"]) for v in history] == [("covid", "dr a", None),
                                                                          ("normal", "dr b", "on second look")]
    assert all(v["time_utc"].endswith("+00:00") and v["origin"] == "api" for v in history)


def test_feedback_needs_the_token_as_predict_does(predictor, toy_images, tmp_path) -> None:
    app = create_app(predictor, ServeConfig(db=str(tmp_path / "log.sqlite")), token=TOKEN)
    with TestClient(app) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        pid = client.post("/api/predict", headers=auth, files={"file": ("x.png", toy_images[0].read_bytes())}).json()[
            "prediction_id"]
        verdict = {"prediction_id": pid, "label": "normal"}
        assert client.post("/api/feedback", json=verdict).status_code == 401
        assert client.post("/api/feedback", json=verdict, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/api/feedback", json=verdict, headers=auth).status_code == 200


def test_dicom_uids_and_kept_files_are_logged(predictor, images, tmp_path) -> None:
    """A DICOM upload's patient id and UIDs go into the log; with keep_images the file is kept as it came, once."""
    dicom = images.dicom(None, np.rint(film(3) * 4095), PatientID="PAT-7", StudyInstanceUID="1.2.3",
                         SeriesInstanceUID="1.2.3.4")
    cfg = ServeConfig(db=str(tmp_path / "log.sqlite"), keep_images=str(tmp_path / "kept"))
    with TestClient(create_app(predictor, cfg)) as client:
        for _ in range(2):
            assert client.post("/api/predict", files={"file": ("a.dcm", dicom)}).status_code == 200
        png = client.post("/api/predict", params={"patient_id": "PAT-9"},
                          files={"file": ("b.png", _png(images))})
        assert png.status_code == 200
    rows = PredictionLog(tmp_path / "log.sqlite").records()
    assert [(r.patient_id, r.study_uid, r.series_uid) for r in rows] == [("PAT-7", "1.2.3", "1.2.3.4")] * 2 + [
        ("PAT-9", None, None)]
    assert rows[0].sop_uid and rows[0].sop_uid == rows[1].sop_uid
    kept = sorted((tmp_path / "kept").iterdir())
    assert sorted(p.suffix for p in kept) == [".dcm", ".png"]
    assert Path(rows[0].image_path).read_bytes() == dicom and rows[0].image_path == rows[1].image_path


def film(seed: int) -> np.ndarray:
    """A toy chest film in [0, 1] (what the tiny run was trained on, so it is scored)."""
    return xray(np.random.default_rng(seed), covid=seed % 2 == 0)


def _png(images, seed: int = 4) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(images.to_u8(film(seed))).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_feedback_import_matches_by_id_hash_and_sop_uid(predictor, images, toy_images, tmp_path) -> None:
    db = tmp_path / "log.sqlite"
    dicom = images.dicom(None, np.rint(film(5) * 4095))
    with TestClient(create_app(predictor, ServeConfig(db=str(db)))) as client:
        by_id = _post(client, toy_images[0])["prediction_id"]
        by_hash = _post(client, toy_images[1])["sha256"]
        client.post("/api/predict", files={"file": ("c.dcm", dicom)})
    sop = PredictionLog(db).records()[-1].sop_uid
    csv = tmp_path / "reports.csv"
    pd.DataFrame([{"prediction_id": by_id, "label": "covid", "reader": "x"}]).to_csv(csv, index=False)
    pd.DataFrame({"sha256": [by_hash, "f" * 64], "label": ["normal", "normal"]}).to_csv(tmp_path / "h.csv",
                                                                                        index=False)
    pd.DataFrame({"SOPInstanceUID": [sop, sop], "label": ["pneumonia", "unsure"]}).to_csv(tmp_path / "s.csv",
                                                                                          index=False)
    assert run_cli("feedback", "import", db, csv).returncode == 0
    hashes = run_cli("feedback", "import", db, tmp_path / "h.csv", "--reader", "reports")
    assert hashes.returncode == 1 and "line 3: no prediction in the log with sha256 ffff" in hashes.stderr
    sops = run_cli("feedback", "import", db, tmp_path / "s.csv")
    assert sops.returncode == 1 and "line 3: label 'unsure'" in sops.stderr
    assert "1 verdict(s) recorded" in sops.stdout
    again = run_cli("feedback", "import", db, csv)
    assert again.returncode == 0 and "0 verdict(s) recorded, 1 already recorded" in again.stdout
    log = PredictionLog(db)
    assert [(v["label"], v["reader"]) for v in log.verdicts(by_id)] == [("covid", "x")]
    assert [(v["label"], v["reader"], v["origin"]) for v in log.verdicts(2)] == [("normal", "reports", "import h.csv")]
    assert [v["label"] for v in log.verdicts(3)] == ["pneumonia"]
    bad = run_cli("feedback", "import", db, tmp_path / "nothing.csv")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def _synthetic(tmp_path: Path) -> Path:
    """1,200 predictions of one model (shift planted at 600, readers' disagreement rising from 10 % to 40 % at 900),
    then 150 from an adapted model."""
    db = bench_monitor().synthetic_log(tmp_path / "log.sqlite", 1200, shift_at=600, disagree_from=900,
                                       verdict_share=0.5, seed=3)
    log = PredictionLog(db)
    log.record_model("run-adapted", 0.4, "covid", np.random.default_rng(4).beta(2, 2, 300), 0.1)
    from covidcxr.deploy.serve.log import LogRecord
    for i, score in enumerate(np.random.default_rng(5).beta(2, 2, 150)):
        log.add(LogRecord(f"2026-03-01T00:{i // 60:02d}:{i % 60:02d}.000+00:00", f"{i:064x}", "a.png", float(score),
                          "covid" if score >= 0.4 else "normal", 0.4, "run-adapted"))
    return db


@pytest.mark.slow
def test_monitor_finds_the_planted_shift_and_the_rise_in_disagreement(tmp_path) -> None:
    db = _synthetic(tmp_path)
    r = run_cli("monitor", db, "--out", tmp_path / "m", "--window", "100")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "m" / "monitor.json").read_text())
    windows = out["windows"]
    assert [w["volume"] for w in windows] == [100] * 12 + [100, 50]  # a new model starts a new window
    assert [w["model_id"] for w in windows] == ["run-synthetic"] * 12 + ["run-adapted"] * 2
    assert [s["windows"] for s in out["segments"]] == [list(range(12)), [12, 13]]
    with sqlite3.connect(db) as conn:
        refused = dict(conn.execute("SELECT status || ': ' || reason, COUNT(*) FROM predictions "
                                    "WHERE status != 'scored' GROUP BY 1").fetchall())
    counted: dict[str, int] = {}
    for w in windows:
        assert w["scored"] + sum(w["refused"].values()) == w["volume"]
        for reason, n in w["refused"].items():
            counted[reason] = counted.get(reason, 0) + n
    assert counted == refused and len(refused) == 2
    alarms = [w["shift"]["alarm"] for w in windows]
    assert alarms[6:12] == [True] * 6 and sum(alarms[:6]) <= 1  # planted at 600; a false alarm is allowed, rarely
    shifted = windows[8]["shift"]
    assert shifted["p_ks"] < shifted["alpha"] / 2 and "not valid" in shifted["message"]
    assert shifted["alpha"] == pytest.approx(0.05 / 3)  # batches of 100: 3 in 300 predictions
    [seq, adapted] = out["sequential"]
    assert seq["h"] == pytest.approx(math.log(IN_CONTROL_RUN)) and seq["p0"] == pytest.approx(0.1)
    first = seq["alerts"][0]
    assert 9 <= first["window"] <= 11  # the rise starts with window 9
    judged = [w["readers"]["verdicts"] for w in windows]
    assert sum(judged[:9]) < first["verdicts_used"] <= sum(judged[:12])
    assert f"crossed h = {math.log(IN_CONTROL_RUN):.2f}" in first["message"] and adapted["alerts"] == []
    early, late = windows[2]["readers"]["agreement"], windows[11]["readers"]["agreement"]
    assert early["ci95"][0] > late["ci95"][1]  # agreement fell, beyond both intervals
    assert windows[11]["readers_so_far"]["verdicts"] == sum(judged[:12])
    for name in ("monitor.html", "volume.png", "positive_rate.png", "scores.png", "agreement.png", "cusum.png"):
        assert (tmp_path / "m" / name).stat().st_size > 1000
    html = (tmp_path / "m" / "monitor.html").read_text()
    assert "Readers disagree more often" in html and "Shift alarm" in html
    assert "first in window 6" in r.stdout or "first in window 5" in r.stdout


@pytest.mark.slow
def test_monitor_by_day_and_since(tmp_path) -> None:
    db = bench_monitor().synthetic_log(tmp_path / "log.sqlite", 700, minutes=5, seed=1)  # 288 a day from Jan 5
    r = run_cli("monitor", db, "--out", tmp_path / "m", "--window", "1d", "--since", "2026-01-06")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "m" / "monitor.json").read_text())
    assert [w["volume"] for w in out["windows"]] == [288, 700 - 2 * 288]
    assert out["windows"][0]["start"].startswith("2026-01-06T00:00")
    bad = run_cli("monitor", db, "--out", tmp_path / "m", "--window", "week")
    assert bad.returncode == 2 and "7d" in bad.stderr


@pytest.mark.slow
def test_health_shows_the_current_window_and_the_alert(predictor, xray_source, tmp_path) -> None:
    """Readers who disagree with every call raise the sequential alert, which /api/health carries for the page."""
    from covidcxr.config.monitor import RISE
    from covidcxr.trust.shift import validation_disagreement

    p0 = validation_disagreement(predictor.spec.run_dir, predictor.threshold, predictor.positive_label)
    needed = math.ceil(math.log(IN_CONTROL_RUN) / math.log((p0 + RISE) / p0))  # disagreements in a row to alert
    n = needed + 2
    root = tmp_path / "src"
    root.mkdir()
    paths = sorted(xray_source(root, n, seed=8).glob("*.png"))
    with TestClient(create_app(predictor, ServeConfig(db=str(tmp_path / "log.sqlite"), monitor_window="100"))) as c:
        answers = [_post(c, p) for p in paths]
        health = c.get("/api/health").json()["monitor"]
        assert health["current"]["volume"] == n and health["alert"] is None
        for a in answers:
            wrong = "normal" if a["label"] == "covid" else "covid"
            verdict = {"prediction_id": a["prediction_id"], "label": wrong}
            assert c.post("/api/feedback", json=verdict).status_code == 200
        health = c.get("/api/health").json()["monitor"]
    assert health["current"]["readers"]["verdicts"] == n and health["current"]["readers"]["agreement"]["value"] == 0
    assert health["alert"] is not None and "readers disagree" in health["alert"]["message"]
    assert health["alert"]["verdicts_used"] == needed


@pytest.mark.slow
def test_export_of_verdicts_feeds_evaluate_and_calibrate(tiny_run, xray_source, images, tmp_path) -> None:
    """Images scored by the service with their files kept, verdicts recorded; `feedback export` makes a data set of
    those with a verdict only, which evaluate and calibrate take."""
    from covidcxr.deploy.predict import Predictor

    root = tmp_path / "src"
    root.mkdir()
    xray_source(root, 60, seed=31)
    meta = pd.read_csv(root / "metadata.csv")
    db, kept = tmp_path / "log.sqlite", tmp_path / "kept"
    cfg = ServeConfig(db=str(db), keep_images=str(kept))
    dicom = images.dicom(None, np.rint(film(9) * 4095), PatientID="PAT-D")
    with TestClient(create_app(Predictor.from_run(tiny_run), cfg)) as client:
        for i, row in meta.iterrows():
            pid = _post(client, root / row["path"], patient_id=f"pt{i}")["prediction_id"]
            client.post("/api/feedback", json={"prediction_id": pid, "label": row["label"]})
        dicom_pid = client.post("/api/predict", files={"file": ("d.dcm", dicom)}).json()["prediction_id"]
        client.post("/api/feedback", json={"prediction_id": dicom_pid, "label": "covid"})
        _post(client, root / meta["path"][0])  # scored again, no new verdict: the image's latest verdict counts
        no_verdict = tmp_path / "extra.png"
        no_verdict.write_bytes(_png(images, seed=12))
        _post(client, no_verdict)
    site = tmp_path / "site"
    r = run_cli("feedback", "export", db, "--out", site)
    assert r.returncode == 0, r.stderr
    assert "61 image(s) with a verdict exported" in r.stdout
    manifest = pd.read_csv(site / "images" / "metadata.csv")
    assert len(manifest) == 61 and "site:PAT-D" not in set(manifest["patient_id"])  # ingest adds the prefix
    assert set(manifest["patient_id"]) >= {"pt0", "PAT-D"} and manifest["label"].value_counts().to_dict() == {
        "covid": 31, "normal": 30}
    ev = run_cli("evaluate", tiny_run, "--data", site, "--split", "all", "--out", tmp_path / "report", "--n-boot",
                 "20", "--no-diagnose")
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n"] == 61
    cal = run_cli("calibrate", tiny_run, "--data", site, "--out", tmp_path / "cal", "--fraction", "0.6",
                  "--finetune-epochs", "0", "--n-boot", "20")
    assert cal.returncode == 0, cal.stderr
    assert (tmp_path / "cal" / "run" / "model.pt").is_file()
    empty = run_cli("feedback", "export", tmp_path / "none.sqlite", "--out", tmp_path / "x")
    assert empty.returncode == 2


def test_an_older_log_is_brought_up_to_date(tmp_path) -> None:
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, time_utc TEXT NOT NULL, sha256 "
                     "TEXT NOT NULL, filename TEXT NOT NULL, probability REAL NOT NULL, label TEXT NOT NULL, "
                     "threshold REAL NOT NULL, model_id TEXT NOT NULL)")
        conn.execute("INSERT INTO predictions VALUES (7, '2025-01-01T00:00:00+00:00', 'ab', 'x.png', 0.9, 'covid', "
                     "0.5, 'run-1')")
    log = PredictionLog(db)
    [row] = log.records()
    assert (row.probability, row.status, row.sop_uid) == (0.9, "scored", None)
    log.add_verdict(7, "normal")
    assert log.refuse("cd", "y.png", "refused", "lateral view", "run-1", 0.5) == 8
