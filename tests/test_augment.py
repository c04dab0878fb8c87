"""Batch augmentation: shapes, determinism, reproducibility, identity at zero magnitude, equalization, crops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from covidcxr.preprocess.augment import (affine_grid, clahe, content_boxes, crop_to_boxes, equalize, normalise, normalise_once,
                              prepare_batch)
from covidcxr.config import AugmentConfig, from_dict

STRONG = AugmentConfig(gamma=0.3, blur=0.5, noise=0.05, resolution_jitter=0.5, hflip=True, equalize="global")
STILL = AugmentConfig(rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0, equalize="none")


def _images(batch: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth blobs plus noise: structure that a wrong resampling or flip would visibly change."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = [
        np.clip(200 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05) + rng.normal(30, 10, (size, size)), 0, 255)
        for cx, cy in rng.uniform(0.2, 0.8, (batch, 2))
    ]
    return torch.from_numpy(np.stack(imgs).astype(np.uint8))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("cfg", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_shape_dtype_and_range(train: bool, cfg: AugmentConfig) -> None:
    out = prepare_batch(_images(), train, cfg, 48, torch.Generator().manual_seed(0))
    assert out.shape == (6, 1, 48, 48) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.05  # an image, not a constant


def test_eval_is_deterministic_and_a_plain_antialiased_resize() -> None:
    images = _images(size=96)
    plain = AugmentConfig(equalize="none")
    out = prepare_batch(images, False, plain, 40)
    again = prepare_batch(images, False, plain, 40, torch.Generator().manual_seed(123))
    assert torch.equal(out, again)
    pil = np.stack([np.asarray(Image.fromarray(im.numpy()).resize((40, 40), Image.BILINEAR)) for im in images])
    # PIL's bilinear reduction is antialiased too; it rounds to uint8, hence the tolerance of ~1 grey level
    np.testing.assert_allclose(out[:, 0].numpy(), pil / 255, atol=1.5 / 255)


def test_eval_equalizes_when_asked() -> None:
    images = _images()
    out = prepare_batch(images, False, dataclasses.replace(STILL, equalize="global"), 64)
    torch.testing.assert_close(out[:, 0], equalize(images))


def test_train_is_reproducible_with_a_seeded_generator_and_differs_from_eval() -> None:
    images = _images()
    first = prepare_batch(images, True, STRONG, 48, torch.Generator().manual_seed(7))
    second = prepare_batch(images, True, STRONG, 48, torch.Generator().manual_seed(7))
    other = prepare_batch(images, True, STRONG, 48, torch.Generator().manual_seed(8))
    evaluated = prepare_batch(images, False, STRONG, 48)
    assert torch.equal(first, second)
    assert (first - other).abs().mean() > 0.01
    assert (first - evaluated).abs().mean() > 0.01


def test_zero_magnitudes_are_the_identity() -> None:
    images = _images()
    out = prepare_batch(images, True, STILL, 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], images.float() / 255, atol=1e-5, rtol=0)


def test_each_augmentation_changes_the_image_on_its_own() -> None:
    images = _images()
    plain = images.float().unsqueeze(1) / 255
    settings = {
        "rotate_deg": 20.0,
        "scale": (1.2, 1.3),
        "translate": 0.1,
        "brightness": 0.2,
        "contrast": 0.3,
        "gamma": 0.4,
        "blur": 1.0,
        "noise": 0.05,
        "resolution_jitter": 1.0,
        "jpeg": 1.0,
        "hflip": True,
    }
    for name, value in settings.items():
        cfg = dataclasses.replace(STILL, **{name: value})
        out = prepare_batch(images, True, cfg, 64, torch.Generator().manual_seed(1))
        assert (out - plain).abs().mean() > 0.003, name


def test_jpeg_recompression_adds_block_artefacts_and_keeps_the_rest() -> None:
    """A re-compressed image stays close to the original (same picture) but not equal; prob 0 leaves it untouched."""
    images = _images()
    plain = images.float().unsqueeze(1) / 255
    out = prepare_batch(images, True, dataclasses.replace(STILL, jpeg=1.0), 64, torch.Generator().manual_seed(2))
    diff = (out - plain).abs()
    assert 0.001 < diff.mean() < 0.05 and out.shape == plain.shape
    untouched = prepare_batch(images, True, dataclasses.replace(STILL, jpeg=0.0), 64, torch.Generator().manual_seed(2))
    torch.testing.assert_close(untouched, plain, atol=1e-5, rtol=0)


def test_affine_grid_matches_torch() -> None:
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, [5, 1, 37, 37], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 37), expected)


def test_rotation_keeps_content_centred_and_pads_black() -> None:
    images = torch.full((2, 64, 64), 200, dtype=torch.uint8)
    cfg = dataclasses.replace(STILL, rotate_deg=45.0, scale=(0.7, 0.7))
    out = prepare_batch(images, True, cfg, 64, torch.Generator().manual_seed(0))
    assert out[:, 0, 30:34, 30:34].min() == pytest.approx(200 / 255)
    assert out[:, 0, 0, 0].max() == 0  # the uncovered corner is black, like the cache's padding


def test_equalization_flattens_a_histogram() -> None:
    rng = np.random.default_rng(0)
    narrow = torch.from_numpy(rng.integers(100, 121, (3, 64, 64), dtype=np.uint8))  # 21 grey levels in a narrow band
    flat = equalize(narrow)
    assert flat.dtype == torch.float32 and flat.min() == 0 and flat.max() == 1
    shares = torch.stack([torch.histc(img, bins=4, min=0, max=1) for img in flat]) / flat[0].numel()
    assert torch.all((shares - 0.25).abs() < 0.06)  # each quarter of the range holds about a quarter of the pixels
    assert torch.all(narrow.float().std(dim=(1, 2)) / 255 < 0.03) and torch.all(flat.std(dim=(1, 2)) > 0.25)
    constant = equalize(torch.full((1, 8, 8), 77, dtype=torch.uint8))
    torch.testing.assert_close(constant, torch.full((1, 8, 8), 77 / 255))


class _RecordDtypes(TorchDispatchMode):
    """Records the dtype and size of every tensor that any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("cfg", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_uint8_batch_is_never_copied_to_float64(train: bool, cfg: AugmentConfig) -> None:
    images = _images()
    generator = torch.Generator().manual_seed(0)
    with _RecordDtypes() as record:
        prepare_batch(images, train, cfg, 48, generator)
    assert record.outputs  # the mode really saw the operations
    assert not [n for dtype, n in record.outputs if dtype == torch.float64 and n >= images.shape[0]]


def test_rejects_non_uint8_or_non_square_input() -> None:
    with pytest.raises(ValueError, match="square uint8 images"):
        prepare_batch(torch.rand(2, 32, 32), False, AugmentConfig(), 32)
    with pytest.raises(ValueError, match="square uint8 images"):
        prepare_batch(torch.zeros(2, 32, 40, dtype=torch.uint8), False, AugmentConfig(), 32)


def test_configs_saved_with_a_boolean_equalize_still_load() -> None:
    assert from_dict(AugmentConfig, {"equalize": True}).equalize == "global"
    assert from_dict(AugmentConfig, {"equalize": False}).equalize == "none"


@pytest.mark.parametrize("bad", [{"equalize": "adaptive"}, {"crop": "centre"}, {"crop": "lungs"}, {"border": 0.5}])
def test_unknown_or_incomplete_preprocessing_settings_are_errors(bad: dict) -> None:
    with pytest.raises(ValueError):
        AugmentConfig(**bad)


def _gradient(size: int = 64) -> torch.Tensor:
    """A left-to-right brightness ramp (an acquisition trait) with faint texture (the anatomy)."""
    ramp = np.linspace(50, 200, size)[None, :].repeat(size, 0) + np.random.default_rng(0).normal(0, 4, (size, size))
    return torch.from_numpy(np.clip(ramp, 0, 255).astype(np.uint8))[None]


def _texture(x: torch.Tensor) -> float:
    """Local contrast: the spread of what a 5 x 5 mean filter removes, away from the edges."""
    high = x - F.avg_pool2d(x[None, None], 5, 1, 2)[0, 0]
    return float(high[4:-4, 4:-4].std())


def test_clahe_keeps_local_texture_and_flattens_a_global_ramp() -> None:
    image = _gradient()
    glob = equalize(image)[0]
    local = clahe(image[:, None].float() / 255, 2.0)[0, 0]
    assert _texture(local) > 1.5 * _texture(glob)
    span = lambda x: float(x[:, -16:].mean() - x[:, :16].mean())  # noqa: E731
    assert 0 < span(local) < 0.5 * span(glob)
    torch.testing.assert_close(normalise(image, AugmentConfig(equalize="clahe"))[0, 0], local)


def _padded_with_marker() -> torch.Tensor:
    """A 64 x 64 cache image: content in rows 16-47 (black padding above and below), a bright marker in a corner."""
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[0, 16:48] = 120
    image[0, 17:20, 1:4] = 255
    return image


def test_content_boxes_find_the_padding_and_an_all_dark_image_is_whole() -> None:
    images = torch.cat([_padded_with_marker(), torch.zeros(1, 64, 64, dtype=torch.uint8)])
    torch.testing.assert_close(content_boxes(images), torch.tensor([[16 / 64, 0, 48 / 64, 1], [0, 0, 1, 1]]))


def test_the_whole_box_is_the_identity_and_a_half_box_zooms_in() -> None:
    images = _images()
    assert torch.equal(crop_to_boxes(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(6, 4)), images)
    half = crop_to_boxes(images, torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(6, 4))
    reference = F.interpolate(images[:, None, 16:48, 16:48].float(), size=64, mode="bilinear", align_corners=False)
    # the first and last output rows and columns blend in the pixels just outside the box; the rest match
    assert (half.float() - reference[:, 0])[:, 1:-1, 1:-1].abs().max() <= 1


def test_border_crop_removes_padding_and_edge_markers() -> None:
    out = normalise(_padded_with_marker(), AugmentConfig(crop="border", border=0.1, equalize="none"))
    assert out.shape == (1, 1, 64, 64)
    assert out.min() == out.max() == pytest.approx(120 / 255)  # no black band, no marker: only the content


@pytest.mark.parametrize("cfg", [AugmentConfig(crop="border", equalize="clahe"), AugmentConfig(crop="border")])
def test_normalise_once_matches_evaluation_and_switches_itself_off(cfg: AugmentConfig) -> None:
    images = _images(size=64)
    once, rest = normalise_once(images, cfg, chunk=4)
    assert once.dtype == torch.uint8 and (rest.equalize, rest.crop) == ("none", "none")
    assert rest.rotate_deg == cfg.rotate_deg  # the random part is kept
    expected = prepare_batch(images, False, cfg, 64)
    assert (prepare_batch(once, False, rest, 64) - expected).abs().max() <= 0.5 / 255 + 1e-6
