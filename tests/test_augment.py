"""Batch augmentation: shapes, reproducibility, identity at zero magnitude, each augmentation on its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import Images
from covidcxr.config import AugmentConfig, from_dict
from covidcxr.preprocess.augment import affine_grid, augment_batch

STRONG = AugmentConfig(gamma=0.3, blur=0.5, noise=0.05, resolution_jitter=0.5, hflip=True, equalize="global")
STILL = AugmentConfig(rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0, equalize="none")


def _images(batch: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(Images.blobs(batch, size, seed))


@pytest.mark.parametrize("cfg", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_shape_dtype_and_range(cfg: AugmentConfig) -> None:
    out = augment_batch(_images(), cfg, 48, torch.Generator().manual_seed(0))
    assert out.shape == (6, 1, 48, 48) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.05  # an image, not a constant


def test_augmentation_is_reproducible_with_a_seeded_generator() -> None:
    images = _images()
    first = augment_batch(images, STRONG, 48, torch.Generator().manual_seed(7))
    second = augment_batch(images, STRONG, 48, torch.Generator().manual_seed(7))
    other = augment_batch(images, STRONG, 48, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert (first - other).abs().mean() > 0.01


def test_zero_magnitudes_are_the_identity() -> None:
    images = _images()
    out = augment_batch(images, STILL, 64, torch.Generator().manual_seed(0))
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
        out = augment_batch(images, cfg, 64, torch.Generator().manual_seed(1))
        assert (out - plain).abs().mean() > 0.003, name


def test_jpeg_recompression_adds_block_artefacts_and_keeps_the_rest() -> None:
    """A re-compressed image stays close to the original (same picture) but not equal; prob 0 leaves it untouched."""
    images = _images()
    plain = images.float().unsqueeze(1) / 255
    out = augment_batch(images, dataclasses.replace(STILL, jpeg=1.0), 64, torch.Generator().manual_seed(2))
    diff = (out - plain).abs()
    assert 0.001 < diff.mean() < 0.05 and out.shape == plain.shape
    untouched = augment_batch(images, dataclasses.replace(STILL, jpeg=0.0), 64, torch.Generator().manual_seed(2))
    torch.testing.assert_close(untouched, plain, atol=1e-5, rtol=0)


def test_affine_grid_matches_torch() -> None:
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, [5, 1, 37, 37], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 37), expected)


def test_rotation_keeps_content_centred_and_pads_black() -> None:
    images = torch.full((2, 64, 64), 200, dtype=torch.uint8)
    cfg = dataclasses.replace(STILL, rotate_deg=45.0, scale=(0.7, 0.7))
    out = augment_batch(images, cfg, 64, torch.Generator().manual_seed(0))
    assert out[:, 0, 30:34, 30:34].min() == pytest.approx(200 / 255)
    assert out[:, 0, 0, 0].max() == 0  # the uncovered corner is black, like the cache's padding


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


@pytest.mark.parametrize("cfg", [AugmentConfig(), STRONG], ids=["default", "strong"])
def test_uint8_batch_is_never_copied_to_float64(cfg: AugmentConfig) -> None:
    images = _images()
    generator = torch.Generator().manual_seed(0)
    with _RecordDtypes() as record:
        augment_batch(images, cfg, 48, generator)
    assert record.outputs  # the mode really saw the operations
    assert not [n for dtype, n in record.outputs if dtype == torch.float64 and n >= images.shape[0]]


def test_rejects_non_uint8_or_non_square_input() -> None:
    with pytest.raises(ValueError, match="square uint8 images"):
        augment_batch(torch.rand(2, 32, 32), AugmentConfig(), 32)
    with pytest.raises(ValueError, match="square uint8 images"):
        augment_batch(torch.zeros(2, 32, 40, dtype=torch.uint8), AugmentConfig(), 32)


def test_configs_saved_with_a_boolean_equalize_still_load() -> None:
    assert from_dict(AugmentConfig, {"equalize": True}).equalize == "global"
    assert from_dict(AugmentConfig, {"equalize": False}).equalize == "none"


@pytest.mark.parametrize("bad", [{"equalize": "adaptive"}, {"crop": "centre"}, {"crop": "lungs"}, {"border": 0.5}])
def test_unknown_or_incomplete_preprocessing_settings_are_errors(bad: dict) -> None:
    with pytest.raises(ValueError):
        AugmentConfig(**bad)

