"""The service's onnxruntime engine on a real tiny run: `export --format serving` and its parity with covidcxr, the
re-export when the run's model changes, and a `covidcxr serve` process that scores without torch in it until a
Grad-CAM is asked for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from conftest import CLI_TIMEOUT_S, run_cli
from covidcxr.data.reader import read_image
from covidcxr.deploy.engine import ENGINE_DIR, ENGINE_FILE, OnnxScorer, ensure_engine
from covidcxr.deploy.predict import Predictor
from covidcxr.scoring import Scorer
from servers import free_port, serve_cli, wait_until_up

pytestmark = pytest.mark.slow  # exports, and `covidcxr serve` and `covidcxr export` in subprocesses


@pytest.fixture(scope="module")
def xrays(xray_source, tmp_path_factory) -> list[Path]:
    """Toy X-ray PNGs of their own sizes, not in the run's data."""
    return sorted(xray_source(tmp_path_factory.mktemp("engine_src"), 6, seed=7).rglob("*.png"))


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(ENGINE_DIR, "*.sqlite*"))
    return to


def test_export_serving_scores_like_covidcxr(tiny_run, xrays, tmp_path):
    out = tmp_path / "engine"
    done = run_cli("export", str(tiny_run), "--format", "serving", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (serving," in done.stdout and "MB)" in done.stdout and "score.onnx" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["engine.json", "score.onnx"]
    engine, scorer = OnnxScorer(out, tiny_run), Scorer.from_run(tiny_run, "cpu")
    images = [read_image(p) for p in xrays]
    ours = np.stack([engine.cache_square(img) for img in images])
    theirs = np.stack([scorer.cache_square(img) for img in images])
    np.testing.assert_array_equal(ours, theirs)  # numpy makes torch's cache square
    np.testing.assert_allclose(engine.scores(ours), scorer.scores(theirs), atol=1e-5)
    assert engine.spec == scorer.spec  # classes, threshold, settings and model id, read without torch


def test_the_engine_is_exported_again_when_the_model_changes(tiny_run, xrays, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    engine_dir = ensure_engine(run)
    made = (engine_dir / ENGINE_FILE).stat().st_mtime_ns
    assert ensure_engine(run) == engine_dir and (engine_dir / ENGINE_FILE).stat().st_mtime_ns == made  # current
    ckpt = torch.load(run / "model.pt", weights_only=False)
    ckpt["model"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run / "model.pt")
    ensure_engine(run)
    assert (engine_dir / ENGINE_FILE).stat().st_mtime_ns != made
    square = Scorer.from_run(run, "cpu").cache_square(read_image(xrays[0]))[None]
    np.testing.assert_allclose(OnnxScorer(engine_dir, run).scores(square), Scorer.from_run(run, "cpu").scores(square),
                               atol=1e-4)  # the changed weights, not the old graph's


def test_a_run_the_engine_cannot_take_is_one_line_naming_the_torch_engine(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    ckpt = torch.load(run / "model.pt", weights_only=False)
    ckpt["meta"]["augment"] = {**ckpt["meta"]["augment"], "equalize": "clahe"}
    torch.save(ckpt, run / "model.pt")
    proc = serve_cli(str(run), "--port", str(free_port()), "--db", str(tmp_path / "log.sqlite"))
    _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 2
    [line] = [ln for ln in err.splitlines() if ln.startswith("covidcxr: error:")]  # after the log's progress lines
    assert "Traceback" not in err
    assert "serving engine could not be exported" in line and "CLAHE" in line and "--engine torch" in line


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_serve_scores_without_torch_until_a_heatmap_is_asked_for(tiny_run, xrays, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    port = free_port()
    proc = serve_cli(str(run), "--port", str(port), "--db", str(tmp_path / "log.sqlite"), "--threads", "1")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        assert httpx.get(f"{url}/api/health").json()["engine"] == "onnxruntime"
        data = xrays[0].read_bytes()
        res = httpx.post(f"{url}/api/predict", files={"file": ("a.png", data)}, timeout=60)
        assert res.status_code == 200, res.text
        want = Predictor.from_run(run).predict_paths([xrays[0]])[0].probability
        assert res.json()["probability"] == pytest.approx(want, abs=1e-4)
        assert not _maps_torch(proc.pid)  # the whole answer came from onnxruntime
        res = httpx.post(f"{url}/api/predict", params={"cam": True}, files={"file": ("a.png", data)}, timeout=120)
        assert res.status_code == 200 and res.json()["heatmap"].startswith("data:image/png;base64,")
        assert _maps_torch(proc.pid)  # Grad-CAM needs the torch model's gradients
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert "for onnxruntime (once per model)" in err  # the daemon's log
    assert json.loads((run / ENGINE_DIR / ENGINE_FILE).read_text())["model_id"] == res.json()["model_id"]
