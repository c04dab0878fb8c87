"""The one preprocessing: squares, equalization, crops, and bit-identical input on the training and scoring paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import Images
from covidcxr.config import AugmentConfig, TrainConfig
from covidcxr.data.cache import ImageCache, to_square
from covidcxr.lungs.boxes import content_boxes
from covidcxr.preprocess.transform import Preprocess, PreprocessSpec, clahe, crop_to_boxes, equalize
from covidcxr.scoring import Scorer
from covidcxr.training.trainer import Trainer


def _levels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().unsqueeze(1)


def test_equalization_flattens_a_histogram_and_keeps_a_constant_image() -> None:
    rng = np.random.default_rng(0)
    narrow = _levels(rng.integers(100, 121, (3, 64, 64), dtype=np.uint8))  # 21 grey levels in a narrow band
    flat = equalize(narrow)
    assert flat.min() == 0 and flat.max() == 1
    shares = torch.stack([torch.histc(img, bins=4, min=0, max=1) for img in flat]) / flat[0].numel()
    assert torch.all((shares - 0.25).abs() < 0.06)  # each quarter of the range holds about a quarter of the pixels
    constant = equalize(torch.full((1, 1, 8, 8), 77.0))
    torch.testing.assert_close(constant, torch.full((1, 1, 8, 8), 77 / 255))


def _gradient(size: int = 64) -> torch.Tensor:
    """A left-to-right brightness ramp (an acquisition trait) with faint texture (the anatomy)."""
    ramp = np.linspace(50, 200, size)[None, :].repeat(size, 0) + np.random.default_rng(0).normal(0, 4, (size, size))
    return _levels(np.clip(ramp, 0, 255).astype(np.uint8)[None])


def _texture(x: torch.Tensor) -> float:
    high = x - F.avg_pool2d(x[None, None], 5, 1, 2)[0, 0]
    return float(high[4:-4, 4:-4].std())


def test_clahe_keeps_local_texture_that_global_equalization_flattens() -> None:
    image = _gradient()
    glob, local = equalize(image)[0, 0], clahe(image / 255, 2.0)[0, 0]
    assert _texture(local) > 1.5 * _texture(glob)
    span = lambda x: float(x[:, -16:].mean() - x[:, :16].mean())  # noqa: E731
    assert 0 < span(local) < 0.5 * span(glob)


def _padded_with_marker() -> torch.Tensor:
    """Content in rows 16-47 (black padding above and below), a bright marker in a corner."""
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 16:48] = 120
    image[0, 0, 17:20, 1:4] = 255
    return image


def test_content_boxes_find_the_padding_and_an_all_dark_image_is_whole() -> None:
    images = torch.cat([_padded_with_marker(), torch.zeros(1, 1, 64, 64)])
    torch.testing.assert_close(content_boxes(images), torch.tensor([[16 / 64, 0, 48 / 64, 1], [0, 0, 1, 1]]))


def test_the_whole_box_is_the_identity_and_a_half_box_zooms_in() -> None:
    images = _levels(Images.blobs())
    assert torch.equal(crop_to_boxes(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(6, 4)), images)
    half = crop_to_boxes(images, torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(6, 4))
    reference = F.interpolate(images[:, :, 16:48, 16:48], size=64, mode="bilinear", align_corners=False)
    assert (half - reference)[:, :, 1:-1, 1:-1].abs().max() <= 1


def test_border_crop_removes_padding_and_edge_markers() -> None:
    pre = Preprocess(PreprocessSpec("pad", 64, 64, AugmentConfig(crop="border", border=0.1, equalize="none")))
    out = pre.normalise(_padded_with_marker())
    assert out.min() == out.max() == 120  # no black band, no marker: only the content


@pytest.mark.parametrize("mode, shape, content", [("pad", (40, 80), (slice(10, 30), slice(0, 40))),
                                                  ("crop", (40, 80), (slice(0, 40), slice(0, 40))),
                                                  ("squash", (40, 80), (slice(0, 40), slice(0, 40)))])
def test_squares_pad_crop_or_squash(mode: str, shape: tuple[int, int], content: tuple[slice, slice]) -> None:
    image = np.full(shape, 0.8, np.float32)
    square = to_square(image, 40, mode)
    assert square.shape == (40, 40) and square.dtype == np.uint8
    inside = square[content]
    assert inside[2:-2, 2:-2].min() == inside.max() == 204  # 0.8 of 255
    if mode == "pad":
        assert square[:8].max() == 0 and square[-8:].max() == 0  # black bands above and below


@pytest.mark.parametrize("augment", [AugmentConfig(), AugmentConfig(crop="border"), AugmentConfig(equalize="clahe"),
                                     AugmentConfig(equalize="none")], ids=["global", "border", "clahe", "none"])
def test_a_file_and_its_cached_copy_give_the_model_bit_identical_input(augment: AugmentConfig) -> None:
    """forward(decoded image) == to_model(normalise_u8(cache square)): the training and scoring paths agree."""
    pre = Preprocess(PreprocessSpec("pad", 64, 48, augment))
    rng = np.random.default_rng(1)
    for h, w in ((90, 70), (50, 120), (64, 64)):
        image = np.clip(rng.normal(0.5, 0.2, (h, w)), 0, 1).astype(np.float32)
        cached = torch.from_numpy(to_square(image, 64))[None]
        via_cache = pre.model_input_u8(pre.normalise_u8(cached))
        direct = pre(torch.from_numpy(image)[None, None])
        assert torch.equal(via_cache, direct)


@pytest.mark.parametrize("data_path", ["memory", "stream"])
def test_training_normalises_exactly_as_scoring_does(tiny_data, tiny_run, data_path: str) -> None:
    """The validation images a run's threshold was chosen on reach the model exactly as `Scorer` feeds them, whether
    the run holds them in memory or streams them from the cache."""
    cfg = TrainConfig(data=str(tiny_data), out=str(tiny_run.parent / "unused"), weights="none", image_size=64,
                      epochs=1, device="cpu", data_path=data_path)
    trainer = Trainer(cfg)
    scorer = Scorer.from_run(tiny_run, "cpu")
    cache = ImageCache(tiny_data)
    raw = cache.load(trainer.val_df["cache_index"])
    val = torch.cat(list(trainer.val_images.in_order(7)))  # a batch size that leaves a partial last batch
    assert torch.equal(val, scorer.normalise(raw))
    assert torch.equal(trainer.preprocess.model_input_u8(val), torch.cat(list(scorer.inputs(raw))))


def test_the_module_scripts_for_export() -> None:
    pre = Preprocess(PreprocessSpec("pad", 64, 48, AugmentConfig(crop="border"))).eval()
    scripted = torch.jit.script(pre)
    image = torch.rand(1, 1, 75, 51)
    assert torch.equal(scripted(image), pre(image))
