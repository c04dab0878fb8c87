"""Exported graphs (ONNX, TorchScript) do covidcxr's whole path: a decoded image of any size in, `covidcxr predict`'s
probability out; the example client needs nothing but onnxruntime and Pillow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import CLI_TIMEOUT_S, run_cli
from covidcxr.data.reader import read_image
from covidcxr.deploy.export import TOLERANCE, ExportParityError, check_parity, runner, synthetic_images
from covidcxr.model.checkpoint import load_checkpoint, save_checkpoint
from covidcxr.model.network import build_model
from covidcxr.scoring import Scorer

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "examples" / "onnx_client.py"
SHAPES = ((300, 200), (200, 333), (256, 256), (97, 131), (640, 480))
SPREAD = 0.5  # logits: probabilities spread over about 0.3-0.7; a larger head scale amplifies float32 noise as well
MAX_SCALE = 10.0  # the head is scaled by at most this: the runtimes' float32 differences (~2e-5 in a barely trained
#                   toy's logit) times 50 passed the 1e-4 tolerance on probabilities; a trained model needs no scale

pytestmark = pytest.mark.slow  # exports, and `covidcxr export` and `covidcxr predict` in subprocesses


def _with_meta(run: Path, out: Path, spread_on: list[Path] | None = None, **augment) -> Path:
    """A copy of `run` whose preprocessing settings are changed by `augment`, and whose head, given `spread_on`, is
    scaled and centred so that those images' probabilities spread over (0, 1) (a tiny run's sit near 0.5, or near 1
    once its head is only scaled up). Without the run's gate: an export is the model's path (the gate is its own
    graph, RUN/gate.onnx), so it is compared with `covidcxr predict` scoring every image."""
    shutil.copytree(run, out)
    for name in ("gate.json", "gate.onnx"):
        (out / name).unlink(missing_ok=True)
    ckpt = load_checkpoint(out / "model.pt")
    model = build_model(ckpt["meta"]["arch"], len(ckpt["meta"]["classes"]), "none").eval()
    model.load_state_dict(ckpt["model"])
    if spread_on:
        _spread(model, Scorer.from_run(run, "cpu"), spread_on)
    meta = {**ckpt["meta"], "augment": {**ckpt["meta"]["augment"], **augment}}
    save_checkpoint(out / "model.pt", model, meta)
    return out


def _spread(model: torch.nn.Module, scorer: Scorer, images: list[Path]) -> None:
    """Scale the head so that the images' logit margins have a standard deviation of SPREAD (scaled by MAX_SCALE at
    most), and shift the positive class's bias so that they centre on 0."""
    squares = np.stack([scorer.cache_square(read_image(p)) for p in images])
    pos = scorer.spec.positive_index
    with torch.no_grad():
        logits = model(torch.cat(list(scorer.inputs(squares))))
        margin = logits[:, pos] - logits[:, 1 - pos]
        scale = min(SPREAD / float(margin.std()), MAX_SCALE)
        model.head.weight.mul_(scale)
        model.head.bias.mul_(scale)
        model.head.bias[pos] -= float(margin.mean()) * scale


@pytest.fixture(scope="module")
def sharp_run(tiny_run, shaped_images, tmp_path_factory) -> Path:
    return _with_meta(tiny_run, tmp_path_factory.mktemp("sharp") / "run", spread_on=shaped_images)


@pytest.fixture(scope="module")
def shaped_images(tmp_path_factory) -> list[Path]:
    """PNGs and a JPEG of several sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate(SHAPES):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.clip(0.3 + 0.5 * np.exp(-((xx - rng.uniform(0.3, 0.6)) ** 2 + (yy - 0.4) ** 2) / 0.03)
                      + rng.normal(0, 0.08, (h, w)), 0, 1)
        path = folder / (f"img{i}.jpg" if i == len(SHAPES) - 1 else f"img{i}.png")
        Image.fromarray((img * 255).astype(np.uint8)).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def _predict(run: Path, paths: list[Path]) -> dict[str, float]:
    done = run_cli("predict", run, *paths, "--format", "json")
    assert done.returncode == 0, done.stderr
    return {Path(r["path"]).name: r["probability"] for r in json.loads(done.stdout)}


def _export(run: Path, fmt: str, out: Path) -> subprocess.CompletedProcess:
    done = run_cli("export", run, "--format", fmt, "--out", out)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def exported(sharp_run, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The sharp run exported once in each format (an ONNX export takes seconds): {format: (file, stdout)}."""
    folder = tmp_path_factory.mktemp("exported")
    return {fmt: (folder / f"model.{fmt}", _export(sharp_run, fmt, folder / f"model.{fmt}").stdout)
            for fmt in ("onnx", "torchscript")}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_exported_graph_gives_covidcxr_predicts_probability_at_any_image_size(
        fmt: str, sharp_run: Path, shaped_images: list[Path], exported: dict) -> None:
    out, stdout = exported[fmt]
    assert "(1, 1, H, W)" in stdout and "MB" in stdout  # the input contract and the size are printed
    expected = _predict(sharp_run, shaped_images)
    run = runner(fmt, out)
    scorer = Scorer.from_run(sharp_run, "cpu")
    got = {p.name: float(run(read_image(p)[None, None])[0, scorer.spec.positive_index]) for p in shaped_images}
    assert max(expected.values()) - min(expected.values()) > 0.05, "probabilities must vary for the test to bite"
    for name, p in expected.items():
        assert abs(got[name] - p) <= TOLERANCE, (name, got[name], p)


@pytest.mark.realdata
def test_onnx_matches_predict_on_real_chest_xrays(shared_cxr: Path, sharp_run: Path, exported: dict) -> None:
    meta = pd.read_csv(shared_cxr / "metadata.csv")
    picks = meta.drop_duplicates(["width", "height"]).groupby("source").head(1).head(6)
    paths = [shared_cxr / p for p in picks["path"]]
    out = exported["onnx"][0]
    expected = _predict(sharp_run, paths)
    run = runner("onnx", out)
    scorer = Scorer.from_run(sharp_run, "cpu")
    for path in paths:
        got = float(run(read_image(path)[None, None])[0, scorer.spec.positive_index])
        assert abs(got - expected[path.name]) <= TOLERANCE, path


def test_the_example_client_needs_only_onnxruntime_and_pillow(sharp_run: Path, shaped_images: list[Path],
                                                              exported: dict) -> None:
    assert "covidcxr" not in "".join(line for line in CLIENT.read_text().splitlines() if "import" in line)
    out = exported["onnx"][0]
    done = subprocess.run([sys.executable, str(CLIENT), str(out), *map(str, shaped_images[:3])],
                          capture_output=True, text=True, check=True, timeout=CLI_TIMEOUT_S)
    scored = {Path(r["path"]).name: r for r in map(json.loads, done.stdout.splitlines())}
    expected = _predict(sharp_run, shaped_images[:3])
    for name, p in expected.items():
        assert abs(scored[name]["probability"] - p) <= TOLERANCE
        assert scored[name]["label"] == ("covid" if p >= scored[name]["threshold"] else "normal")


def test_onnx_metadata_carries_classes_threshold_settings_and_contract(sharp_run: Path, exported: dict) -> None:
    out = exported["onnx"][0]
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    ckpt = load_checkpoint(sharp_run / "model.pt")["meta"]
    assert meta["classes"] == ["normal", "covid"] and meta["positive_index"] == 1
    assert meta["threshold"] == pytest.approx(ckpt["threshold"])
    assert meta["settings"]["augment"]["equalize"] == ckpt["augment"]["equalize"]
    assert meta["settings"]["cache_size"] == ckpt["cache_size"] and "(1, 1, H, W)" in meta["contract"]


@pytest.mark.parametrize("augment, reason", [({"crop": "lungs", "lung_model": "x.pt"}, "lung-cropped"),
                                             ({"equalize": "clahe"}, "CLAHE")])
def test_runs_whose_preprocessing_has_no_graph_form_are_refused_in_one_line(
        augment: dict, reason: str, tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = _with_meta(tiny_run, tmp_path / "run", **augment)
    if "lung_model" in augment:  # the run's own copy of its lung model, as training writes it
        from covidcxr.lungs.unet import LungUNet
        model = LungUNet((4, 8), 32)
        torch.save({"state_dict": model.state_dict(), "config": {"channels": [4, 8], "size": 32}}, run / "lungs.pt")
    done = run_cli("export", run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert done.returncode == 2 and reason in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_parity_check_catches_a_graph_that_differs(tiny_run: Path, exported: dict) -> None:
    with pytest.raises(ExportParityError):  # the sharp run's graph checked against the unsharpened run
        check_parity(Scorer.from_run(tiny_run, "cpu"), "torchscript", exported["torchscript"][0], synthetic_images())
