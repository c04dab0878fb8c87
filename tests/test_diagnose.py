"""Shortcut diagnostics: on toy X-rays whose label is carried only by a burned-in corner marker, the checks say so;
models that read only the lungs or only the corner are told apart by the occlusion test."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_lungs import TOY_LUNGS, toy_xray

from covidcxr.evaluation import diagnose as dg
from covidcxr.lungs import heuristic as lungs
from covidcxr.data.cache import to_square
from covidcxr.config import AugmentConfig, IngestConfig, TrainConfig, to_dict
from covidcxr.data.ingest import ingest
from covidcxr.training.trainer import train

SIZE = 64
META = {"augment": to_dict(AugmentConfig()), "image_size": SIZE, "positive_index": 1, "threshold": 0.5}


def marked_xray(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """A toy X-ray; positives get a bright burned-in marker in the bottom-right corner, far from the lungs."""
    img, _ = toy_xray(rng, 120, 100)
    if positive:
        img[-14:-3, -30:-4] = 1.0
    return img


def _write_source(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        Image.fromarray((marked_xray(rng, positive) * 255).astype(np.uint8)).save(root / f"x{i:03d}.png")
        rows.append({"path": f"x{i:03d}.png", "label": "covid" if positive else "normal", "patient_id": f"p{seed}-{i}",
                     "source": "a" if i % 3 else "b"})  # sources carry nothing: they are random w.r.t. the image
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): a real training run on data whose only label cue is the corner marker."""
    data = tmp_path_factory.mktemp("data")
    source = _write_source(tmp_path_factory.mktemp("src"), 200, 0)
    assert ingest([source], data, IngestConfig(size=SIZE, workers=1)).kept == 200
    run = train(TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("run")), weights="none", image_size=SIZE,
                            epochs=5, batch_size=16, lr=0.05, device="cpu", seed=0, deterministic=True, amp=False,
                            patience=10, split_fractions=(0.5, 0.2, 0.3)))
    return data, run


@pytest.fixture(scope="module")
def diagnosed(shortcut_run, tmp_path_factory) -> tuple[dict, Path, Path]:
    data, run = shortcut_run
    out = tmp_path_factory.mktemp("diag")
    return dg.diagnose(run, data, out), out, run


def test_shortcut_is_flagged(diagnosed):
    result, _, run = diagnosed
    split = pd.read_csv(run / "split.csv")
    assert result["split"] == "test" and result["n_images"] == (split["split"] == "test").sum()
    occ = result["occlusion"]["conditions"]
    assert occ["intact"]["auc"] > 0.75, "the toy model must have learned the marker"
    assert occ["lungs blanked"]["auc"] > 0.75  # the marker survives blanking the lungs...
    assert occ["lungs only"]["auc"] < occ["lungs blanked"]["auc"] - 0.2  # ...and is gone when only lungs are kept
    groups = result["image_stats"]["groups"]
    assert groups["all"]["auc"] > 0.95 and groups["padding and border"]["auc"] > 0.95  # the marker is bright
    assert groups["size and aspect"]["auc"] < 0.7  # every toy has the same size: nothing to learn there
    flags = result["flags"]
    assert flags["occlusion"] is True and flags["image_stats"] is True
    assert flags["source_probe"] is False  # the sources here are random, nothing in the image tells them apart
    assert "Shortcut learning is likely" in dg.verdict(result)


def test_outputs_are_complete_and_self_contained(diagnosed):
    result, out, _ = diagnosed
    assert json.loads((out / "diagnose.json").read_text()) == result
    assert "NaN" not in (out / "diagnose.json").read_text()
    for name in dg.FIGURES:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) >= 200, name
    assert (out / "verdict.md").read_text().strip() == dg.verdict(result)
    page = (out / "diagnose.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(dg.FIGURES)
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert not re.search(r'(src|href)="(http|/|\.)', page)  # no external assets
    assert f'{result["occlusion"]["conditions"]["lungs blanked"]["auc"]:.3f}' in page
    snippet = dg.diagnostics_html(result, out)
    assert snippet.startswith("<div") and "<html" not in snippet and "Shortcut learning is likely" in snippet


def test_other_data_set_is_scored_whole(shortcut_run, tmp_path):
    _, run = shortcut_run
    other, src = tmp_path / "other", tmp_path / "src"
    src.mkdir()
    ingest([_write_source(src, 40, 7)], other, IngestConfig(size=SIZE, workers=1))
    result = dg.diagnose(run, other, tmp_path / "diag", max_cam_images=10)
    assert result["split"] == "all" and result["n_images"] == 40
    assert result["cam"]["overall"]["sampled"] == 10 and result["cam"]["overall"]["with_evidence"] <= 10


class _RegionReader(torch.nn.Module):
    """A stand-in model: its COVID-19 logit is the mean brightness inside a fixed region of the input."""

    def __init__(self, region: np.ndarray):
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([torch.zeros_like(score), 40 * (score - 0.5)], dim=1)


def _toy_set(label_in_lungs: bool, n: int = 40) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """uint8 squares, labels, rows: positives carry either a lung opacity or the corner marker."""
    rng = np.random.default_rng(3)
    y = np.arange(n) % 2
    images = []
    for positive in y:
        img, lung = toy_xray(rng, 120, 100)
        if positive and label_in_lungs:
            img = np.where(lung, np.clip(img + 0.3, 0, 1), img)  # dense opacities filling both lungs
        elif positive:
            img[-14:-3, -30:-4] = 1.0
        images.append(to_square(img, SIZE))
    rows = pd.DataFrame({"path": [f"t{i}" for i in range(n)], "source": "a", "patient_id": [str(i) for i in range(n)]})
    return np.stack(images), y, rows


def _inner_lungs(shape: tuple[int, int]) -> np.ndarray:
    """The middle of the toy lungs in padded input coordinates (120 x 100 films padded to squares)."""
    rows, cols = np.mgrid[: shape[0], : shape[1]] / np.array(shape)[:, None, None]
    cols = (cols - 10 / 120) * 120 / 100  # undo the side padding
    return np.any([((rows - cy) / (0.6 * ry)) ** 2 + ((cols - cx) / (0.6 * rx)) ** 2 <= 1
                   for cy, cx, ry, rx in TOY_LUNGS], axis=0)


@pytest.mark.parametrize("label_in_lungs", [True, False])
def test_occlusion_separates_lung_readers_from_corner_readers(label_in_lungs):
    images, y, rows = _toy_set(label_in_lungs)
    masks, _ = lungs.lung_masks(images)
    corner = np.zeros((SIZE, SIZE), bool)
    corner[-8:, -15:] = True
    model = _RegionReader(_inner_lungs((SIZE, SIZE)) if label_in_lungs else corner)
    occ = dg.occlusion_test(model, META, images, masks, rows, y, torch.device("cpu"), n_boot=50)
    auc = {c: occ["conditions"][c]["auc"] for c in dg.CONDITIONS}
    assert auc["intact"] > 0.95
    if label_in_lungs:  # the evidence is in the lungs: gone when they are blanked, kept when only they are kept
        assert auc["lungs blanked"] < 0.65 and auc["lungs only"] > 0.95
    else:
        assert auc["lungs blanked"] > 0.95 and auc["lungs only"] < 0.65
    assert 0 < occ["fill_level"] < 255


def test_occlude_fills_with_one_level():
    images = np.stack([np.full((8, 8), v, np.uint8) for v in (10, 200)])
    masks = np.zeros((2, 8, 8), bool)
    masks[:, 2:5, 2:5] = True
    blanked = dg.occlude(images, masks, "lungs blanked", 99)
    assert (blanked[:, 2:5, 2:5] == 99).all() and (blanked[0][~masks[0]] == 10).all()
    only = dg.occlude(images, masks, "lungs only", 99)
    assert (only[1][~masks[1]] == 99).all() and (only[1, 2:5, 2:5] == 200).all()
    assert dg.fill_level(images) == 105
    with pytest.raises(ValueError, match="unknown occlusion"):
        dg.occlude(images, masks, "lungs inverted", 0)


def test_image_stats_find_size_but_not_noise():
    rng = np.random.default_rng(5)
    n = 60
    y = np.arange(n) % 2
    images = np.stack([to_square(toy_xray(rng, 120, 100)[0], SIZE) for _ in range(n)])
    groups = np.arange(n)
    same_size = pd.DataFrame({"orig_height": np.full(n, 120), "orig_width": np.full(n, 100)})
    size_tells = pd.DataFrame({"orig_height": np.where(y == 1, 120, 240), "orig_width": np.where(y == 1, 100, 200)})
    found = dg.image_stats_check(dg.image_features(images, size_tells), y, groups)
    assert found["groups"]["size and aspect"]["auc"] > 0.95 and found["features"]["log_pixels"] == 1.0
    nothing = dg.image_stats_check(dg.image_features(images, same_size), y, groups)
    assert nothing["groups"]["all"]["auc"] < 0.75  # labels independent of the images
    one_class = dg.image_stats_check(dg.image_features(images, same_size), np.zeros(n, int), groups)
    assert one_class["groups"] == {} and "too few" in one_class["note"]


def test_lung_share_and_its_summary():
    masks = np.zeros((3, 10, 10), bool)
    masks[:, :, :5] = True
    cams = np.zeros((3, 10, 10), np.float32)
    cams[0, :, :5] = 1  # all inside
    cams[1] = 1  # spread evenly: the lungs' area share
    share = dg.lung_share(cams, masks)
    assert share[0] == 1.0 and share[1] == pytest.approx(0.5) and math.isnan(share[2])
    rows = pd.DataFrame({"source": ["a", "a", "b"], "label": ["covid", "normal", "covid"]})
    summary = dg.cam_lung_share(cams, masks, rows)
    assert summary["overall"]["sampled"] == 3 and summary["overall"]["with_evidence"] == 2
    assert summary["overall"]["lung_share"] == pytest.approx(0.75) and summary["overall"]["enrichment"] == pytest.approx(1.5)
    assert summary["per_source"]["b"]["with_evidence"] == 0 and math.isnan(summary["per_source"]["b"]["lung_share"])
