"""Shortcut diagnostics: on toy X-rays whose label is carried only by a burned-in corner marker, the checks say so;
models that read only the lungs or only the corner are told apart by the occlusion test; at about 30 images the
checks still find a real cue, and say "inconclusive", never "no sign", when they cannot tell."""

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

from covidcxr.config import AugmentConfig, GateSettings, IngestConfig, TrainConfig, to_dict
from covidcxr.data.cache import to_square
from covidcxr.data.ingest import ingest
from covidcxr.evaluation import diagnose as dg
from covidcxr.evaluation.diagnose.probe import source_probe
from covidcxr.lungs import heuristic as lungs
from covidcxr.preprocess.transform import PreprocessSpec
from covidcxr.scoring import RunSpec, Scorer
from covidcxr.training.trainer import train
from test_lungs_heuristic import TOY_LUNGS, toy_xray

SIZE = 64
META = {"augment": to_dict(AugmentConfig()), "image_size": SIZE, "positive_index": 1, "threshold": 0.5}


def _scorer(model: torch.nn.Module) -> Scorer:
    """A Scorer around an in-memory model, with the run settings of META."""
    spec = RunSpec(Path(), "alexnet", "covid-vs-normal", ("normal", "covid"), 1, META["threshold"], "youden",
                   PreprocessSpec("pad", SIZE, SIZE, AugmentConfig()), "test-model")
    return Scorer(model, spec, torch.device("cpu"))


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
    # a ResNet-18 learns the marker in a few small batches; a tiny AlexNet from scratch barely moves in 5 epochs
    run = train(TrainConfig(data=str(data), out=str(tmp_path_factory.mktemp("run")), arch="resnet18", weights="none",
                            image_size=SIZE, epochs=6, batch_size=16, lr=0.01, device="cpu", seed=0, deterministic=True,
                            amp=False, patience=10, split_fractions=(0.5, 0.2, 0.3), gate=GateSettings(enabled=False)))
    return data, run


@pytest.fixture(scope="module")
def diagnosed(shortcut_run, tmp_path_factory) -> tuple[dict, Path, Path]:
    data, run = shortcut_run
    out = tmp_path_factory.mktemp("diag")
    return dg.diagnose(run, data, out), out, run


@pytest.mark.slow
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
    # The sources here are random, nothing in the image tells them apart: no probe's interval lies above chance (a
    # cross-validated probe on ~30 images per label can land below it). That interval may or may not rule out an
    # encoded source: ok or inconclusive, never flagged.
    for p in result["source_probe"]["within_label"].values():
        assert p["balanced_accuracy_ci95"][0] <= p["chance"]
    assert flags["source_probe"] is not True
    assert "Shortcut learning is likely" in dg.verdict(result)


@pytest.mark.slow
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


@pytest.mark.slow
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
    occ = dg.occlusion_test(_scorer(model), images, masks, rows, y, n_boot=50)
    auc = {c: occ["conditions"][c]["auc"] for c in dg.CONDITIONS}
    assert auc["intact"] > 0.95
    if label_in_lungs:  # the evidence is in the lungs: gone when they are blanked, kept when only they are kept
        assert auc["lungs blanked"] < 0.65 and auc["lungs only"] > 0.95
    else:
        assert auc["lungs blanked"] > 0.95 and auc["lungs only"] < 0.65
    assert 0 < occ["fill_level"] < 255
    assert occ["auc_drop"]["value"] == pytest.approx(auc["intact"] - auc["lungs blanked"])
    assert dg.flags(_with_others(occ))["occlusion"] is (not label_in_lungs)


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


def _with_others(occlusion: dict) -> dict:
    """A diagnose result around one occlusion outcome; the other three checks could not be made (no images)."""
    return {"positive_label": "covid", "occlusion": occlusion, "source_probe": {"overall": None, "within_label": {}},
            "image_stats": {"groups": {}, "features": {}, "note": "inconclusive (too few images): 0 of one class"},
            "cam": {"overall": {"sampled": 0, "with_evidence": 0, "lung_share": math.nan, "lung_area": math.nan,
                                "enrichment": math.nan}}}


def _noisy_lungs_marked_corner(n: int, lung_noise: float, seed: int = 3) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Positives carry the corner marker; every image's lungs get a random brightness offset (noise for a model that
    reads lungs and corner together, removed when the lungs are blanked)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    images = []
    for positive in y:
        img, lung = toy_xray(rng, 120, 100)
        img = np.where(lung, np.clip(img + rng.uniform(-lung_noise, lung_noise), 0, 1), img)
        if positive:
            img[-14:-3, -30:-4] = 1.0
        images.append(to_square(img, SIZE))
    rows = pd.DataFrame({"path": [f"t{i}" for i in range(n)], "source": "a", "patient_id": [str(i) for i in range(n)]})
    return np.stack(images), y, rows


def _corner() -> np.ndarray:
    corner = np.zeros((SIZE, SIZE), bool)
    corner[-8:, -15:] = True
    return corner


def test_occlusion_flags_an_auc_that_rises_without_the_lungs():
    """30 images, a model reading the corner marker and the (noisy, uninformative) lungs: blanking the lungs removes
    the noise and the AUC rises. That is no sign of a lung reader: flagged (it was marked ok)."""
    images, y, rows = _noisy_lungs_marked_corner(30, 0.15)
    masks, _ = lungs.lung_masks(images)
    model = _RegionReader(_corner() | _inner_lungs((SIZE, SIZE)))
    occ = dg.occlusion_test(_scorer(model), images, masks, rows, y, n_boot=200)
    intact, blanked = occ["conditions"]["intact"], occ["conditions"]["lungs blanked"]
    assert 0.5 < intact["auc_ci95"][0] and intact["auc"] < 0.95 and blanked["auc"] > intact["auc"]
    assert occ["auc_drop"]["ci95"][1] < 0  # the paired interval: a rise, beyond doubt
    result = _with_others(occ)
    assert dg.flags(result)["occlusion"] is True
    assert "- Occlusion (flag):" in dg.verdict(result) and "does not fall" in dg.verdict(result)


def test_occlusion_of_a_chance_level_model_is_inconclusive():
    """Labels that the region the model reads knows nothing about: intact AUC about 0.5, so blanking cannot show
    where the model looks. It was marked ok (blanked AUC < 0.75) and the verdict read "No sign"."""
    images, _, rows = _noisy_lungs_marked_corner(30, 0.0)
    y = np.random.default_rng(1).permutation(np.arange(30) % 2)  # the marker no longer follows the label
    masks, _ = lungs.lung_masks(images)
    occ = dg.occlusion_test(_scorer(_RegionReader(_inner_lungs((SIZE, SIZE)))), images, masks, rows, y, n_boot=200)
    lo, hi = occ["conditions"]["intact"]["auc_ci95"]
    assert lo < 0.5 < hi
    result = _with_others(occ)
    assert dg.flags(result)["occlusion"] is None and "(inconclusive)" in dg.verdict(result)


def _brightened(n: int, y: np.ndarray, shift: float, seed: int = 5) -> np.ndarray:
    """Toy films, positives `shift` brighter (e.g. another exposure): one intensity statistic tells the classes."""
    rng = np.random.default_rng(seed)
    return np.stack([to_square(np.clip(toy_xray(rng, 120, 100)[0] + shift * k, 0, 1), SIZE) for k in y])


SAME_SIZE_30 = pd.DataFrame({"orig_height": np.full(30, 120), "orig_width": np.full(30, 100)})


@pytest.mark.slow
def test_image_stats_find_one_brightness_cue_in_30_images():
    """At 30 images the old gradient-boosted check was constant (AUC exactly 0.500 in every group)."""
    y = np.arange(30) % 2
    stats = dg.image_stats_check(dg.image_features(_brightened(30, y, 0.03), SAME_SIZE_30), y, np.arange(30))
    for group in ("all", "intensity histogram"):
        assert stats["groups"][group]["auc_ci95"][0] > 0.5, group
    assert stats["groups"]["size and aspect"]["auc"] == 0.5  # all the same size: nothing there
    assert dg.flags({**_with_others(_empty_occlusion()), "image_stats": stats})["image_stats"] is True


def _empty_occlusion() -> dict:
    undefined = {"auc": math.nan, "auc_ci95": [math.nan, math.nan], "sensitivity": math.nan, "specificity": math.nan}
    return {"conditions": {c: undefined for c in dg.CONDITIONS}, "auc_drop": {"value": math.nan,
                                                                               "ci95": [math.nan, math.nan]}}


@pytest.mark.slow
def test_chance_level_checks_give_an_inconclusive_verdict():
    """30 images whose labels and sources have nothing to do with the pixels, checked for real: every check comes
    out ok or inconclusive, and the verdict reads "Inconclusive", not "No sign of shortcut learning"."""
    rng = np.random.default_rng(11)
    n = 30
    y = rng.permutation(np.arange(n) % 2)
    images, _, rows = _noisy_lungs_marked_corner(n, 0.0)
    rows = rows.assign(source=rng.permutation(np.arange(n) % 2).astype(str), label=np.where(y, "covid", "normal"))
    masks, _ = lungs.lung_masks(images)
    result = {
        "positive_label": "covid",
        "occlusion": dg.occlusion_test(_scorer(_RegionReader(_inner_lungs((SIZE, SIZE)))), images, masks, rows, y,
                                       n_boot=200),
        "source_probe": source_probe(rng.normal(size=(n, 16)), rows),
        "image_stats": dg.image_stats_check(dg.image_features(images, SAME_SIZE_30), y, np.arange(n)),
        "cam": dg.cam_lung_share(np.ones((n, SIZE, SIZE), np.float32), masks, rows),  # spread evenly: ratio 1
    }
    flags = dg.flags(result)
    assert True not in flags.values() and None in flags.values(), flags
    text = dg.verdict(result)
    assert text.startswith("**Inconclusive**") and "No sign of shortcut learning" not in text
    lo, hi = result["image_stats"]["groups"]["all"]["auc_ci95"]
    assert lo < 0.5 < hi


def test_too_few_images_are_inconclusive_not_reassuring():
    y = np.arange(8) % 2
    stats = dg.image_stats_check(dg.image_features(_brightened(8, y, 0.3), SAME_SIZE_30.iloc[:8]), y, np.arange(8))
    assert stats["groups"] == {} and stats["note"].startswith("inconclusive (too few images)")
    assert dg.flags({**_with_others(_empty_occlusion()), "image_stats": stats}) == {
        "source_probe": None, "occlusion": None, "image_stats": None, "cam": None}
    assert dg.verdict({**_with_others(_empty_occlusion()), "image_stats": stats}).startswith("**Inconclusive**")


@pytest.mark.parametrize(("where", "flag"), [("inside", False), ("everywhere", None), ("outside", True)])
def test_grad_cam_is_ok_only_when_drawn_to_the_lungs(where, flag):
    """An even spread (ratio 1) is what coarse central maps give anyway: inconclusive, not ok."""
    masks = np.zeros((12, 10, 10), bool)
    masks[:, :, :4] = True
    cams = np.ones((12, 10, 10), np.float32)
    if where != "everywhere":
        cams[:, :, :4] = 3.0 if where == "inside" else 0.2
    rows = pd.DataFrame({"source": "a", "label": ["covid", "normal"] * 6})
    result = {**_with_others(_empty_occlusion()), "cam": dg.cam_lung_share(cams, masks, rows)}
    assert dg.flags(result)["cam"] is flag
    few = {**result, "cam": dg.cam_lung_share(cams[:5], masks[:5], rows[:5])}
    assert dg.flags(few)["cam"] is None and "too few images" in dg.verdict(few)


@pytest.mark.slow
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
    assert one_class["groups"] == {} and "too few images" in one_class["note"]


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
    assert summary["overall"]["lung_share"] == pytest.approx(0.75)
    assert summary["overall"]["enrichment"] == pytest.approx(1.5)
    assert summary["per_source"]["b"]["with_evidence"] == 0 and math.isnan(summary["per_source"]["b"]["lung_share"])
