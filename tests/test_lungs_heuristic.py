"""Lung masks: the heuristic finds drawn lungs on a toy X-ray and plausible lungs on real films."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from covidcxr.data.cache import to_square
from covidcxr.data.reader import read_image
from covidcxr.lungs import heuristic as lungs

# the toy's lungs: (centre row, centre column, semi-axis rows, semi-axis columns) as fractions of the film
TOY_LUNGS = ((0.45, 0.30, 0.30, 0.16), (0.47, 0.70, 0.31, 0.16))


def _ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]] / np.array(shape)[:, None, None]
    return ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1


def toy_xray(rng: np.random.Generator, height: int = 240, width: int = 200,
             lung_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(float image in [0, 1], true lung mask): a bright body with two dark lungs on a dark background, ribs, a
    smooth random texture and noise; geometry jittered a little, so no two toys are copies."""
    shape = (height, width)
    jitter = rng.uniform(-0.03, 0.03, 2)
    body = _ellipse(shape, 0.55, 0.5, 0.6, 0.47)
    lung = np.zeros(shape, bool)
    for cy, cx, ry, rx in TOY_LUNGS:
        size = lung_scale * rng.uniform(0.9, 1.1, 2)
        lung |= _ellipse(shape, cy + jitter[0], cx + jitter[1], ry * size[0], rx * size[1])
    rows = np.arange(height)[:, None] / height
    ribs = 0.06 * np.sin(2 * np.pi * rows * 9 + rng.uniform(0, 6)) * np.ones((1, width))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    texture = 0.4 * (np.asarray(coarse, np.float32) / 255 - 0.5)
    img = 0.08 + 0.6 * body - 0.38 * lung + np.where(lung, ribs, 0) + np.where(body, texture, 0)
    return np.clip(img + rng.normal(0, 0.03, shape), 0, 1), lung


def _padded(img: np.ndarray, truth: np.ndarray, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Image and true mask as the cache stores them: padded to a square and resized."""
    return to_square(img, size), to_square(truth.astype(np.float32), size) > 127


def _recall(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask & truth).sum() / truth.sum())


def test_toy_lungs_are_covered():
    square, truth = _padded(*toy_xray(np.random.default_rng(0)))
    mask, refined = lungs.lung_mask(square)
    assert refined == 2  # both dark lungs found in the image
    assert _recall(mask, truth) > 0.97
    assert (mask & truth).sum() / mask.sum() > 0.5  # generous, but not the whole chest
    assert ndimage.label(mask)[1] == 2


def test_lungs_beyond_the_template_are_added():
    square, truth = _padded(*toy_xray(np.random.default_rng(0), lung_scale=1.25))
    template = lungs.template(square.shape, lungs.content_box(square)).any(axis=0)
    mask, _ = lungs.lung_mask(square)
    assert _recall(mask, truth) > 0.97 and _recall(mask, truth) > _recall(template, truth) + 0.03


def test_content_box_leaves_out_padding():
    img, _ = toy_xray(np.random.default_rng(1), height=200, width=120)
    square = to_square(img, 100)  # portrait film: black bars left and right
    top, bottom, left, right = lungs.content_box(square)
    assert (top, bottom) == (0, 100)
    assert 18 <= left <= 21 and 79 <= right <= 82
    assert lungs.lung_mask(square)[0][:, :left].sum() == 0


def test_template_fallback_on_a_blank_image():
    flat = np.full((64, 64), 128, np.uint8)
    mask, refined = lungs.lung_mask(flat)
    assert refined == 0
    assert np.array_equal(mask, lungs.template(flat.shape, (0, 64, 0, 64)).any(axis=0))


def test_batch_masks_match_single_masks():
    rng = np.random.default_rng(2)
    batch = np.stack([to_square(toy_xray(rng)[0], 128) for _ in range(3)])
    masks, refined = lungs.lung_masks(batch)
    assert masks.shape == batch.shape and masks.dtype == bool and refined.shape == (3,)
    assert np.array_equal(masks[1], lungs.lung_mask(batch[1])[0])
    with pytest.raises(ValueError, match="2-D"):
        lungs.lung_mask(batch)


@pytest.mark.realdata
def test_real_films_get_two_plausible_lungs(shared_cxr):
    meta = pd.read_csv(shared_cxr / "metadata.csv")
    sample = meta[meta["label"].isin(["covid", "normal"])].groupby("source").head(2)
    for path in sample["path"]:
        square = to_square(read_image(shared_cxr / path), 256)
        mask, _ = lungs.lung_mask(square)
        top, bottom, left, right = lungs.content_box(square)
        inside = np.zeros_like(mask)
        inside[top:bottom, left:right] = True
        assert not (mask & ~inside).any(), path
        share = mask.sum() / inside.sum()
        assert 0.15 <= share <= 0.6, (path, share)
        labels, n = ndimage.label(mask)
        assert n == 2, (path, n)
        centres = [np.mean(np.nonzero(labels == k)[1]) for k in (1, 2)]
        assert min(centres) < (left + right) / 2 < max(centres), path  # one lung on each side
