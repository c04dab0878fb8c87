"""The README's walkthrough of the loop at a site, end to end on real films of ../shared/cxr: a small run is served, a
stream of films it never trained on is scored over HTTP (patients of the sources it learnt from, then another
collection), readers' verdicts come through the API and from a CSV of reports, `monitor` follows the log, `feedback
export` makes the judged films a data set, `validate` and `calibrate` take it, and the adapted run is served on the
same log. Every command is the real CLI in its own process."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest

from conftest import CLI_TIMEOUT_S, run_cli, shared_cxr_path
from covidcxr.trust.gate import REASONS
from servers import free_port, serve_cli, wait_until_up

TRAINED_ON = {"qatar": "covid", "armiro": "covid", "rsna": "normal", "nih": "normal"}  # source: the label taken
TRAIN_PER_SOURCE = 75  # films of each source the run is trained on (their patients' other films too)
STREAM_PER_SOURCE = 30  # films of each trained-on source sent, from patients the run never saw: 120
OTHER, OTHER_FILMS = "cohen", 60  # then films of a collection the run never saw
WINDOW = 60  # predictions per monitor window: the two windows of trained-on sources, then the other collection's
GATE_STEPS = 150  # a short gate (the default fits 600 steps) keeps the test quick; the walkthrough serves with it
IMPORTED_EVERY, UNJUDGED_EVERY = (18, 5), (18, 11)  # (every, offset): films judged from a CSV, films never judged


def _films() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training films, the stream in the order it is sent): covid and normal films only (the run's task), the
    stream's trained-on part from patients outside the training films, shuffled, then the other collection's."""
    cxr = shared_cxr_path()
    if not (cxr / "metadata.csv").is_file():
        pytest.skip(f"real chest X-rays not found at {cxr} (set COVIDCXR_SHARED)")
    meta = pd.read_csv(cxr / "metadata.csv", dtype=str, keep_default_na=False)
    meta["file"] = [str(cxr / p) for p in meta["path"]]
    train, stream = [], []
    for source, label in TRAINED_ON.items():
        rows = meta[(meta["source"] == source) & (meta["label"] == label)]
        seen = rows["patient_id"].head(TRAIN_PER_SOURCE).unique()
        train.append(rows[rows["patient_id"].isin(seen)])
        stream.append(rows[~rows["patient_id"].isin(seen)].head(STREAM_PER_SOURCE))
    other = meta[(meta["source"] == OTHER) & meta["label"].isin(["covid", "normal"])]
    other = pd.concat([other[other["label"] == "normal"], other[other["label"] == "covid"]]).head(OTHER_FILMS)
    own = pd.concat(stream).sample(frac=1, random_state=0)
    return pd.concat(train), pd.concat([own, other.sample(frac=1, random_state=0)], ignore_index=True)


def _train(train: pd.DataFrame, root: Path) -> Path:
    """`covidcxr ingest` and `covidcxr train`: one short epoch at 64 px from scratch, a gate of GATE_STEPS."""
    films = root / "films"
    films.mkdir()
    train.assign(path=[os.path.relpath(f, films) for f in train["file"]]).drop(columns="file").to_csv(
        films / "metadata.csv", index=False)
    (root / "train.yaml").write_text(f"gate:\n  steps: {GATE_STEPS}\n")
    result = run_cli("ingest", films, "--out", root / "data", "--size", "128")
    assert result.returncode == 0, result.stderr
    result = run_cli("train", root / "data", "--out", root / "run", "--weights", "none", "--epochs", "1",
                     "--image-size", "64", "--device", "cpu", "--config", root / "train.yaml")
    assert result.returncode == 0, result.stderr
    return root / "run"


@contextmanager
def _served(run: Path, db: Path, kept: Path) -> Iterator[str]:
    """`covidcxr serve RUN --keep-images KEPT --db DB` on a free loopback port; its base URL."""
    port = free_port()
    proc = serve_cli(str(run), "--keep-images", str(kept), "--db", str(db), "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=CLI_TIMEOUT_S)


def _predict(url: str, film: pd.Series) -> httpx.Response:
    path = Path(film["file"])
    return httpx.post(f"{url}/api/predict", params={"patient_id": film["patient_id"]},
                      files={"file": (path.name, path.read_bytes(), "image/png")}, timeout=CLI_TIMEOUT_S)


def _stream(url: str, stream: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """Send the stream; a reader's verdict (the film's label) through /api/feedback for most scored films, a CSV of
    reports (by SHA-256) for some, none for others. One row per film sent: its answer, and its verdict, if any."""
    rows = []
    for i, film in stream.iterrows():
        res = _predict(url, film)
        assert res.status_code in (200, 422), res.text  # 422: the gate refused the film, which the log records
        answer = res.json() if res.status_code == 200 else {}
        how = None if not answer else "csv" if i % IMPORTED_EVERY[0] == IMPORTED_EVERY[1] else \
            None if i % UNJUDGED_EVERY[0] == UNJUDGED_EVERY[1] else "api"
        if how == "api":
            feedback = httpx.post(f"{url}/api/feedback", json={"prediction_id": answer["prediction_id"],
                                                               "label": film["label"], "reader": "dr walk"})
            assert feedback.status_code == 200 and feedback.json()["history"] == 1, feedback.text
        rows.append({"status": "scored" if answer else "refused", "called": answer.get("label"),
                     "sha256": answer.get("sha256"), "model_id": answer.get("model_id"),
                     "prediction_id": answer.get("prediction_id"), "label": film["label"], "how": how})
    sent = pd.DataFrame(rows)
    reports = sent[sent["how"] == "csv"]
    reports[["sha256", "label"]].assign(reader="report").to_csv(csv, index=False)
    # a report names an image: it judges every prediction of that image (a film sent twice is judged twice)
    judged = (sent["how"] == "api") | (sent["sha256"].isin(reports["sha256"]) & (sent["status"] == "scored"))
    return sent.assign(verdict=sent["label"].where(judged))


def _readers(films: pd.DataFrame) -> dict:
    """What monitor must find in the readers' verdicts on these films: how many, agreement, sensitivity and
    specificity (COVID-19 positive)."""
    judged = films[films["verdict"].notna()]
    called, truth = judged["called"] == "covid", judged["verdict"] == "covid"
    return {"verdicts": len(judged), "agreement": (called == truth).sum() / len(judged),
            "sensitivity": (called & truth).sum() / truth.sum(),
            "specificity": (~called & ~truth).sum() / (~truth).sum()}


def _monitor(db: Path, out: Path) -> dict:
    result = run_cli("monitor", db, "--out", out, "--window", WINDOW)
    assert result.returncode == 0, result.stderr
    assert (out / "monitor.html").is_file()
    return json.loads((out / "monitor.json").read_text())


@pytest.mark.slow
def test_the_loop_at_a_site_on_real_films(tmp_path: Path) -> None:
    train, stream = _films()
    run = _train(train, tmp_path)
    db, kept = tmp_path / "site.sqlite", tmp_path / "kept"

    # serve, predict a stream, record verdicts; more verdicts from the reports
    with _served(run, db, kept) as url:
        sent = _stream(url, stream, tmp_path / "reports.csv")
        original = httpx.get(f"{url}/api/health").json()["model_id"]
    assert set(sent["model_id"].dropna()) == {original}
    assert (sent["status"] == "scored").sum() >= 0.8 * len(sent), sent["status"].value_counts()
    imported = sent["sha256"].isin(pd.read_csv(tmp_path / "reports.csv")["sha256"]).sum()
    result = run_cli("feedback", "import", db, tmp_path / "reports.csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{imported} verdict(s) recorded, 0 already recorded, 0 row(s) not used")

    # monitor: windows of WINDOW predictions, what was sent and what readers said in each
    report = _monitor(db, tmp_path / "monitor")
    assert report["n_predictions"] == len(sent)
    assert [s["model_id"] for s in report["segments"]] == [original]
    windows = report["windows"]
    assert [w["volume"] for w in windows] == [WINDOW] * (len(sent) // WINDOW)
    for w in windows:
        films = sent.iloc[w["first_id"] - 1:w["last_id"]]
        scored = films[films["status"] == "scored"]
        assert w["scored"] == len(scored) and sum(w["refused"].values()) == len(films) - len(scored)
        assert {r.removeprefix("refused: ") for r in w["refused"]} <= set(REASONS.values())  # by reason, not by file
        assert w["positive_rate"]["value"] == pytest.approx((scored["called"] == "covid").mean())
        assert w["shift"]["n"] == len(scored) and isinstance(w["shift"]["alarm"], bool) and "p_ks" in w["shift"]
        expected = _readers(scored)
        assert w["readers"]["verdicts"] == expected["verdicts"]
        for figure in ("agreement", "sensitivity", "specificity"):
            assert w["readers"][figure]["value"] == pytest.approx(expected[figure]), figure
    assert windows[-1]["readers_so_far"]["verdicts"] == sent["verdict"].notna().sum()
    assert windows[-1]["readers_so_far"]["agreement"]["value"] == pytest.approx(_readers(sent)["agreement"])
    assert report["sequential"][0]["verdicts"] == sent["verdict"].notna().sum()

    # export the judged films as the site's data set; validate and calibrate on it
    site = tmp_path / "site"
    result = run_cli("feedback", "export", db, "--out", site)
    assert result.returncode == 0, result.stderr
    judged = sent[sent["verdict"].notna()].drop_duplicates("sha256")
    assert result.stdout.startswith(f"{len(judged)} image(s) with a verdict exported")
    exported = pd.read_csv(site / "images" / "metadata.csv")
    assert sorted(exported["label"]) == sorted(judged["label"])
    result = run_cli("validate", run, "--data", site, "--out", tmp_path / "validation", "--n-boot", 50)
    assert result.returncode == 0, result.stderr
    validation = json.loads((tmp_path / "validation" / "validation.json").read_text())
    assert validation["verdict"] in ("validated", "not validated", "insufficient data")
    assert validation["site"]["n"] + validation["site"]["n_refused"] == len(judged)
    assert validation["model_card"]["model_id"] == original
    adapted = tmp_path / "adapted"
    result = run_cli("calibrate", run, "--data", site, "--out", adapted, "--n-boot", 50, "--finetune-epochs", 0)
    assert result.returncode == 0, result.stderr
    calibration = json.loads((adapted / "calibration.json").read_text())
    assert calibration["choice"] in calibration["candidates"] and (adapted / "run" / "model.pt").is_file()
    assert sum(calibration["counts"].values()) == len(judged)

    # serve the adapted run on the same log: a new model id starts a new segment (the original's, kept, does not)
    with _served(adapted / "run", db, kept) as url:
        answer = _predict(url, stream.iloc[0])
        assert answer.status_code == 200, answer.text
        served = httpx.get(f"{url}/api/health").json()["model_id"]
    assert answer.json()["model_id"] == served
    assert (served == original) == (calibration["choice"] == "nothing")
    segments = _monitor(db, tmp_path / "monitor-after")["segments"]
    assert [s["model_id"] for s in segments] == list(dict.fromkeys([original, served]))
    assert segments[-1]["windows"] == ([len(windows)] if served != original else list(range(len(windows) + 1)))
