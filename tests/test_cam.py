"""Grad-CAM: maps at the model input's size, in [0, 1], that follow the class asked about and the evidence for it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import xray
from covidcxr.model.cam import OVERLAY_MIN_SIDE, cam_overlay_png, grad_cam, write_cams
from covidcxr.model.network import GrayClassifier, build_model

SIDE = 128  # AlexNet's last conv map is 7x7 here: coarse, but enough to tell one corner from another
BLOB = (32, 92)  # (row, column): off-centre and off the diagonal, so a transposed or flipped map misses it
RADIUS = 14


def _centre_taps(conv: torch.nn.Conv2d, channels: tuple[int, ...]) -> None:
    """Make `conv` pass the given channels through unchanged (1 at the kernel centre) and drop the rest."""
    conv.weight.zero_()
    conv.bias.zero_()
    k = conv.kernel_size[0] // 2
    for c in channels:
        conv.weight[c, c, k, k] = 1.0


@torch.no_grad()
def _brightness_model() -> GrayClassifier:
    """A real gray AlexNet wired by hand: channel 0 of every conv carries local brightness, channel 1 local darkness;
    the COVID logit is mean brightness minus mean darkness, the normal logit the opposite. Evidence for COVID is
    therefore where the image is bright, evidence for normal where it is dark."""
    model = build_model("alexnet", 2, "none").eval()
    features, classifier = model.backbone.features, model.backbone.classifier
    first = features[0]
    first.weight.zero_()
    first.bias.zero_()
    area = first.kernel_size[0] * first.kernel_size[1]
    first.weight[0], first.weight[1], first.bias[1] = 1 / area, -1 / area, 1.0
    for i in (3, 6, 8, 10):
        _centre_taps(features[i], (0, 1))
    pooled = 6 * 6  # AdaptiveAvgPool2d((6, 6)) then flatten: channel c occupies features c*36 .. c*36+35
    for linear in (classifier[1], classifier[4]):
        linear.weight.zero_()
        linear.bias.zero_()
    classifier[1].weight[0, :pooled], classifier[1].weight[1, pooled:2 * pooled] = 1 / pooled, 1 / pooled
    classifier[4].weight[0, 0], classifier[4].weight[1, 1] = 1.0, 1.0
    model.head.weight.zero_()
    model.head.bias.zero_()
    model.head.weight[1, :2] = torch.tensor([1.0, -1.0])
    model.head.weight[0, :2] = torch.tensor([-1.0, 1.0])
    return model


def _blob_image() -> tuple[torch.Tensor, np.ndarray]:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    blob = (yy - BLOB[0]) ** 2 + (xx - BLOB[1]) ** 2 < RADIUS ** 2
    return torch.from_numpy(np.where(blob, 0.9, 0.1).astype(np.float32))[None, None], blob


def test_map_has_the_inputs_shape_values_in_0_1_and_depends_on_the_class(predictor):
    square = predictor.square(xray(np.random.default_rng(0), covid=True))
    x = next(predictor.scorer.inputs(square[None]))
    torch.manual_seed(0)  # a fixed model: a barely trained one (as tiny runs are) may see no evidence for a class
    model = build_model("alexnet", 2, "none").eval()  # anywhere, and its map for that class is rightly blank
    maps = {c: grad_cam(model, x, c) for c in (0, 1)}
    for m in maps.values():
        assert m.shape == (1, *x.shape[2:]) and x.shape[2] == predictor.spec.preprocess.image_size
        assert m.min() >= 0 and m.max() <= 1 and m.max() > 0.5  # normalised, not blank
    assert not np.allclose(maps[0], maps[1], atol=1e-3)


def test_map_peaks_where_the_evidence_is():
    model = _brightness_model()
    x, blob = _blob_image()
    assert model(x)[0, 1] > model(torch.full_like(x, 0.1))[0, 1]  # the blob is evidence for COVID
    covid, normal = grad_cam(model, x, 1)[0], grad_cam(model, x, 0)[0]
    assert covid.shape == blob.shape
    peak = np.unravel_index(covid.argmax(), covid.shape)
    assert np.hypot(peak[0] - BLOB[0], peak[1] - BLOB[1]) < RADIUS + 8
    assert covid[blob].mean() > 5 * covid[~blob].mean()
    assert normal[blob].mean() < 0.2 * normal[~blob].mean()  # the other class's evidence lies elsewhere


def test_batch_maps_equal_single_maps():
    model = _brightness_model()
    x, _ = _blob_image()
    pair = torch.cat([x, x.flip(-1)])
    maps = grad_cam(model, pair, 1)
    np.testing.assert_allclose(maps[0], grad_cam(model, x, 1)[0], atol=1e-5)
    np.testing.assert_allclose(maps[1], grad_cam(model, x.flip(-1), 1)[0], atol=1e-5)
    assert not np.allclose(maps[0], maps[1], atol=1e-2)


def test_overlay_png_is_the_model_input_in_colour(predictor, images):
    png = cam_overlay_png(predictor.scorer, predictor.square(images.smooth(1)))
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size[0] == img.size[1] >= OVERLAY_MIN_SIDE
        assert img.size[0] % predictor.spec.preprocess.image_size == 0  # a whole-number enlargement of the model input
        rgb = np.asarray(img, dtype=np.int16)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 30  # a heatmap was blended in, not just gray


def test_write_cams_keeps_one_overlay_per_image_when_names_repeat(predictor, images, tmp_path):
    paths = [images.save(tmp_path / "a.png", images.smooth(0)), images.save(tmp_path / "a.jpg", images.smooth(1)),
             images.save(tmp_path / "sub" / "a.png", images.smooth(2))]
    squares, _ = predictor.read_squares(paths)
    written = write_cams(predictor.scorer, [(Path(p), s) for p, s in squares.items()], tmp_path / "cams")
    assert len(written) == len(set(written)) == 3
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(p.name for p in written)
