"""Learned lung masks: fetching the masks from a wheel, pairing them with images, training, segmenting, boxes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from covidcxr.cli import main
from covidcxr.data.download import DownloadError
from covidcxr.lungs.fetch import MASK_FOLDER, MASKS_ZIP, fetch_masks, paired_images
from covidcxr.lungs.segment import load_lung_model, lung_boxes, segment, two_largest_parts
from covidcxr.lungs.train import _dice, _load_pairs, train_lung_model
from covidcxr.lungs.unet import LungUNet


def build_wheel(folder: Path, masks: dict[str, np.ndarray] | None) -> Path:
    """A minimal torchxrayvision 1.5.7 wheel in folder; with the masks zip holding masks (name -> bool array) unless
    masks is None."""
    folder.mkdir(parents=True, exist_ok=True)
    info = "torchxrayvision-1.5.7.dist-info"
    files = {
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: torchxrayvision\nVersion: 1.5.7\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    wheel = folder / "torchxrayvision-1.5.7-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        if masks is not None:
            inner = folder / "masks.zip"
            with zipfile.ZipFile(inner, "w") as mz:
                for name, mask in masks.items():
                    png = folder / name
                    Image.fromarray(mask.astype(np.uint8) * 255).save(png)
                    mz.write(png, f"{MASK_FOLDER}/{name}")
            zf.write(inner, MASKS_ZIP)
        zf.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in zf.namelist()) + f"{info}/RECORD,,\n")
    return wheel


def toy_film(rng: np.random.Generator, height: int = 48, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(gray image in [0, 1], lung mask): two dark ellipses, jittered in place and size, on a brighter body, with
    a random exposure and noise."""
    rows, cols = np.mgrid[:height, :width] / np.array([height, width])[:, None, None]
    body = ((rows - 0.55) / 0.6) ** 2 + ((cols - 0.5) / 0.47) ** 2 <= 1
    lung = np.zeros((height, width), bool)
    for cx in (0.3, 0.7):
        cy, ry, rx = rng.uniform(0.4, 0.5), rng.uniform(0.22, 0.32), rng.uniform(0.11, 0.16)
        lung |= ((rows - cy) / ry) ** 2 + ((cols - cx + rng.uniform(-0.03, 0.03)) / rx) ** 2 <= 1
    img = rng.uniform(0.05, 0.15) + rng.uniform(0.5, 0.7) * body - 0.35 * lung + rng.normal(0, 0.05, lung.shape)
    return np.clip(img, 0, 1), lung


def write_toy_data(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """A raw data folder (metadata.csv with path and origin_path) of n toy films and a mask folder named like the
    films' origin files."""
    rng = np.random.default_rng(seed)
    data, masks = root / "data", root / "masks"
    (data / "images").mkdir(parents=True)
    masks.mkdir()
    rows = []
    for i in range(n):
        img, lung = toy_film(rng)
        Image.fromarray((img * 255).astype(np.uint8)).save(data / "images" / f"{i:03d}.png")
        Image.fromarray(lung.astype(np.uint8) * 255).save(masks / f"orig{i:03d}.jpg")
        rows.append({"path": f"images/{i:03d}.png", "origin_path": f"images/orig{i:03d}.jpg",
                     "patient_id": f"p{i}"})
    pd.DataFrame(rows).to_csv(data / "metadata.csv", index=False)
    return data, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, pd.DataFrame, dict]:
    """One small model trained on 40 toy films, shared by the tests that use a trained model."""
    root = tmp_path_factory.mktemp("lungseg")
    pairs = paired_images(*write_toy_data(root, 40))
    out = root / "model" / "lungs.pt"
    result = train_lung_model(pairs, out, size=48, epochs=12, batch_size=8, seed=0, val_fraction=0.2)
    return out, pairs, result


def test_fetch_masks_from_a_wheel(tmp_path):
    mask = np.zeros((30, 40), bool)
    mask[5:20, 8:30] = True
    wheel_dir = build_wheel(tmp_path / "wheels", {"a.jpeg": mask, "b.png": ~mask}).parent
    folder = fetch_masks(tmp_path / "out", find_links=str(wheel_dir))
    assert folder == tmp_path / "out" / MASK_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpeg", "b.png"]
    assert np.array_equal(np.asarray(Image.open(folder / "a.jpeg")) > 127, mask)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [MASK_FOLDER]  # no temporary folder left
    # masks present: pip is not run again (this folder has no wheel, so pip would fail)
    assert fetch_masks(tmp_path / "out", find_links=str(tmp_path / "out")) == folder


def test_fetch_masks_errors_are_one_line(tmp_path):
    no_masks = build_wheel(tmp_path / "wheels", None).parent
    with pytest.raises(DownloadError, match=f"has no member {MASKS_ZIP}") as err:
        fetch_masks(tmp_path / "out", find_links=str(no_masks))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DownloadError, match=r"pip download torchxrayvision==1\.5\.7 failed: .+") as err:
        fetch_masks(tmp_path / "out", find_links=str(tmp_path / "empty"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / MASK_FOLDER).exists()


def test_paired_images_by_origin_path_or_path(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    (data / "images").mkdir(parents=True)
    masks.mkdir()
    for name in ("x1.jpg", "x3.jpeg", "2.png"):
        (masks / name).write_bytes(b"")
    pd.DataFrame({"path": ["images/1.png", "images/2.png", "images/3.png"],
                  "origin_path": ["repo/images/x1.jpg", None, "x3.jpeg"]}).to_csv(data / "metadata.csv", index=False)
    pairs = paired_images(data, masks)
    assert list(pairs.columns) == ["image", "mask"]
    assert pairs.values.tolist() == [[str(data / "images/1.png"), str(masks / "x1.jpg")],
                                     [str(data / "images/3.png"), str(masks / "x3.jpeg")]]
    pd.DataFrame({"path": ["images/1.png", "images/2.png"]}).to_csv(data / "metadata.csv", index=False)
    assert paired_images(data, masks).values.tolist() == [[str(data / "images/2.png"), str(masks / "2.png")]]
    pd.DataFrame({"path": ["images/9.png"]}).to_csv(data / "metadata.csv", index=False)
    with pytest.raises(ValueError, match="no image of .* has a mask"):
        paired_images(data, masks)
    with pytest.raises(FileNotFoundError, match="mask folder"):
        paired_images(data, tmp_path / "nowhere")


def test_a_mask_of_another_shape_is_refused(tmp_path):
    """A shrunk copy of the original film pairs with its full-size mask; a film of another aspect ratio does not."""
    pairs = []
    for i, (img_shape, mask_shape) in enumerate([((20, 30), (40, 60)), ((20, 40), (40, 40))]):
        Image.fromarray(np.full(img_shape, 100, np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray(np.full(mask_shape, 255, np.uint8)).save(tmp_path / f"{i}_mask.png")
        pairs.append({"image": str(tmp_path / f"{i}.png"), "mask": str(tmp_path / f"{i}_mask.png")})
    images, masks = _load_pairs(pd.DataFrame(pairs[:1]), 16)
    assert images.shape == masks.shape == (1, 1, 16, 16) and bool(masks.all())
    with pytest.raises(ValueError, match="differ in aspect ratio"):
        train_lung_model(pd.DataFrame(pairs), tmp_path / "m.pt", size=16, epochs=1)


@pytest.mark.slow
def test_unet_learns_toy_lungs(trained):
    metrics = trained[2]["metrics"]
    assert metrics["val_dice"] > 0.8
    assert (metrics["train_images"], metrics["val_images"]) == (32, 8)
    assert trained[2]["config"]["size"] == 48


@pytest.mark.slow
def test_checkpoint_round_trip_reproduces_the_val_dice(trained):
    out, pairs, result = trained
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["metrics"] == result["metrics"]
    assert json.loads(out.with_suffix(".json").read_text()) == result
    model = load_lung_model(out)
    assert not model.training and model.size == 48
    val = pairs[pairs["image"].isin(ckpt["val_set"])]
    assert len(val) == result["metrics"]["val_images"]
    images, masks = _load_pairs(val, 48)
    dice = _dice(segment(model, images), masks.bool()).mean()
    assert dice == pytest.approx(result["metrics"]["val_dice"], abs=1e-4)
    untrained = LungUNet(size=48).eval()
    assert _dice(segment(untrained, images), masks.bool()).mean() < 0.6


@pytest.mark.slow
def test_segment_returns_masks_at_the_input_size(trained):
    model = load_lung_model(trained[0])
    films = [toy_film(np.random.default_rng(100 + i), 96, 72) for i in range(3)]
    images = torch.from_numpy(np.stack([f for f, _ in films])[:, None]).float()
    masks = segment(model, images)
    assert masks.shape == (3, 1, 96, 72) and masks.dtype == torch.bool
    truth = torch.from_numpy(np.stack([m for _, m in films])[:, None])
    assert _dice(masks, truth).min() > 0.75


def test_two_largest_parts_drops_stray_blobs():
    masks = torch.zeros(3, 1, 60, 60, dtype=torch.bool)
    masks[0, 0, 10:50, 5:25] = masks[0, 0, 10:45, 35:55] = True  # two lungs
    masks[0, 0, 55:58, 0:4] = True  # a blob at the film's edge
    masks[1, 0, 10:50, 5:25] = True  # one part only
    masks[1, 0, 10:20, 35:40] = True  # second part, small: kept
    kept = two_largest_parts(masks)
    expected = masks.clone()
    expected[0, 0, 55:58, 0:4] = False
    assert torch.equal(kept, expected)  # and the empty third mask stays empty
    boxes, _ = lung_boxes(kept, margin=0.0)
    assert torch.allclose(boxes[0], torch.tensor([10 / 60, 5 / 60, 50 / 60, 55 / 60]))


def test_lung_boxes_on_drawn_masks():
    masks = torch.zeros(4, 1, 100, 50, dtype=torch.bool)
    masks[0, 0, 20:60, 10:40] = True
    masks[1, 0, 0:50, 5:20] = True
    masks[1, 0, 10:60, 30:48] = True  # two lungs: one box around both
    masks[3, 0, 10:20, 10:19] = True  # 1.8 % of the image: too small to be lungs
    boxes, fallback = lung_boxes(masks, margin=0.0)
    assert fallback.tolist() == [False, False, True, True]
    assert torch.allclose(boxes, torch.tensor([[0.2, 0.2, 0.6, 0.8], [0.0, 0.1, 0.6, 0.96],
                                               [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    boxes, _ = lung_boxes(masks[:2, 0], margin=0.1)  # (B, H, W) works too
    assert torch.allclose(boxes, torch.tensor([[0.16, 0.14, 0.64, 0.86], [0.0, 0.014, 0.66, 1.0]]))


@pytest.mark.slow
def test_cli_lungs_train(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["lungs", "train", "--help"])
    assert done.value.code == 0 and "--masks" in capsys.readouterr().out
    data, masks = write_toy_data(tmp_path, 8)
    out = tmp_path / "lungs.pt"
    code = main(["lungs", "train", str(data), "--masks", str(masks), "--out", str(out), "--size", "32",
                 "--epochs", "1"])
    assert code == 0 and out.is_file()
    assert "val Dice" in capsys.readouterr().out
    assert main(["lungs", "train", str(data), "--masks", str(tmp_path), "--out", str(out)]) == 2
    assert "no image of" in capsys.readouterr().err


@pytest.mark.slow
def test_lung_crop_boxes_follow_the_lungs_and_report_films_without_them(trained):
    from covidcxr.config import AugmentConfig
    from covidcxr.preprocess.transform import Preprocess, PreprocessSpec
    pre = Preprocess(PreprocessSpec("pad", 64, 64, AugmentConfig(crop="lungs", lung_model=str(trained[0]))))
    films = [toy_film(np.random.default_rng(200 + i), 64, 64) for i in range(3)]
    images = torch.from_numpy((np.stack([f for f, _ in films]) * 255).astype(np.uint8))
    truth, _ = lung_boxes(torch.from_numpy(np.stack([m for _, m in films])), margin=0.1)
    torch.testing.assert_close(pre.lung_boxes(images.unsqueeze(1).float()), truth, atol=0.08, rtol=0)
    with pytest.warns(UserWarning, match="1 of 1 images have no lung mask"):
        box = pre.lung_boxes(torch.zeros(1, 1, 64, 64))
    assert box.tolist() == [[0.0, 0.0, 1.0, 1.0]]


@pytest.mark.slow
def test_a_lung_cropped_run_keeps_its_lung_model_and_is_scored_and_diagnosed_with_it(trained, tiny_data, tmp_path):
    from covidcxr.config import GateSettings
    from covidcxr.deploy.predict import Predictor
    from covidcxr.evaluation.diagnose import diagnose
    from covidcxr.evaluation.evaluate import evaluate
    from covidcxr.model.checkpoint import LUNG_MODEL, load_run
    from covidcxr.training.trainer import TrainConfig, train
    lung_copy = tmp_path / "my-lungs.pt"
    lung_copy.write_bytes(trained[0].read_bytes())
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), weights="none", image_size=64, epochs=1,
                      device="cpu", seed=0, amp=False, gate=GateSettings(enabled=False))
    cfg.augment.crop, cfg.augment.lung_model = "lungs", str(lung_copy)
    run = train(cfg)
    assert (run / LUNG_MODEL).read_bytes() == trained[0].read_bytes()
    lung_copy.unlink()  # the run must not depend on the file it was given
    _, meta = load_run(run)
    assert meta["augment"]["lung_model"] == str(run / LUNG_MODEL)
    metrics = evaluate(run, tiny_data, "test", tmp_path / "report", n_boot=20, diagnostics=False)
    assert 0.0 <= metrics["auc"]["value"] <= 1.0
    predictor = Predictor.from_run(run)
    square = predictor.square(toy_film(np.random.default_rng(5), 80, 64)[0])
    assert 0.0 <= float(predictor.scorer.scores(square[None])[0]) <= 1.0
    result = diagnose(run, tiny_data, tmp_path / "diag", max_cam_images=20)
    assert result["lung_masks"]["method"].startswith("learned")
    assert 0.1 < result["lung_masks"]["mean_area_fraction"] < 0.6


@pytest.mark.slow
def test_evaluate_can_take_a_lung_model_for_its_diagnostics(trained, tiny_run, tiny_data, tmp_path):
    out = tmp_path / "report"
    argv = ["evaluate", str(tiny_run), "--data", str(tiny_data), "--out", str(out), "--n-boot", "20",
            "--lung-model", str(trained[0])]
    assert main(argv) == 0
    method = json.loads((out / "diagnose" / "diagnose.json").read_text())["lung_masks"]["method"]
    assert method.startswith("learned") and str(trained[0]) in method
