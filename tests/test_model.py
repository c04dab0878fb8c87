"""The gray model: folded normalisation against the RGB original, weights sources, checkpoints, source head."""

from __future__ import annotations

import copy
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from covidcxr.errors import WeightsUnavailableError
from covidcxr.model.checkpoint import load_checkpoint, load_run, save_checkpoint
from covidcxr.model.network import (
    ARCHS,
    GrayClassifier,
    build_model,
    forward_with_features,
    parameter_groups,
    source_logits,
)
from covidcxr.model.weights import IMAGENET_MEAN, IMAGENET_STD, LUMA_MEAN, LUMA_STD, fold_normalisation

# first conv and the layers that form the "first layer" output compared below (conv, or conv + BatchNorm)
FIRST_LAYER = {"alexnet": ("features.0", None), "resnet18": ("conv1", "bn1")}
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def _normalised_rgb(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _random_torchvision(arch: str, path: Path) -> nn.Module:
    """A randomly initialised torchvision model, saved as a torchvision-format state dict at `path`."""
    torch.manual_seed(0)
    tv = torchvision.models.get_model(arch, weights=None).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding into running_mean is really exercised
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(tv.state_dict(), path)
    return tv


def _first_layer(model: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    conv, norm = FIRST_LAYER[arch]
    y = model.get_submodule(conv)(x)
    return model.get_submodule(norm)(y) if norm else y


def _padding_free(conv: nn.Conv2d, size: int) -> torch.Tensor:
    """Mask of output pixels whose receptive field lies wholly inside the image (no zero padding touched)."""
    pad = conv.padding[0]
    outside = F.pad(torch.zeros(1, 1, size, size), (pad,) * 4, value=1.0)
    ones = torch.ones(1, 1, *conv.kernel_size)
    return F.conv2d(outside, ones, stride=conv.stride, dilation=conv.dilation)[0, 0] == 0


@pytest.mark.parametrize("arch", sorted(FIRST_LAYER))
def test_first_layer_equals_rgb_layer_on_normalised_image_in_interior(arch: str, tmp_path: Path) -> None:
    tv = _random_torchvision(arch, tmp_path / "tv.pth")
    gray = build_model(arch, 1000, str(tmp_path / "tv.pth")).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        rgb_out = _first_layer(tv, arch, _normalised_rgb(x))
        gray_out = _first_layer(gray.backbone, arch, x)
    interior = _padding_free(tv.get_submodule(FIRST_LAYER[arch][0]), 64)
    assert gray.backbone.get_submodule(FIRST_LAYER[arch][0]).in_channels == 1
    assert 0 < interior.sum() < interior.numel()
    torch.testing.assert_close(gray_out[..., interior], rgb_out[..., interior], atol=1e-5, rtol=1e-5)
    # the border really differs (gray pads 0, RGB pads normalised 0), which is why it is excluded above
    assert (gray_out[..., ~interior] - rgb_out[..., ~interior]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", sorted(FIRST_LAYER))
def test_logits_match_rgb_model(arch: str, tmp_path: Path) -> None:
    tv = _random_torchvision(arch, tmp_path / "tv.pth")
    gray = build_model(arch, 1000, str(tmp_path / "tv.pth")).eval()  # 1000 classes: the original head is kept
    x = torch.rand(2, 1, 224, 224)
    pad = tv.get_submodule(FIRST_LAYER[arch][0]).padding[0]
    # Same border for both: pad the gray image with 0 first and let the RGB model's first conv pad nothing.
    # Then the whole networks must agree to float precision.
    same_border = copy.deepcopy(tv)
    same_border.get_submodule(FIRST_LAYER[arch][0]).padding = (0, 0)
    with torch.no_grad():
        rgb = tv(_normalised_rgb(x))
        rgb_same_border = same_border(_normalised_rgb(F.pad(x, (pad,) * 4)))
        out = gray(x)
    scale = rgb.std()
    torch.testing.assert_close(out, rgb_same_border, atol=1e-4 * scale, rtol=1e-4)
    # With each model's own zero padding only the first conv's border pixels differ (1 of 55 rows and columns on
    # each side for AlexNet at 224 px); that perturbation spreads through the network but stays a few percent of
    # the logits' spread, and the logits stay almost perfectly correlated.
    assert (out - rgb).abs().max() < 0.15 * scale
    assert torch.corrcoef(torch.stack([out.flatten(), rgb.flatten()]))[0, 1] > 0.999


def test_random_first_conv_gets_luminance_normalisation() -> None:
    conv = nn.Conv2d(1, 8, 5, stride=2, padding=2)
    gray = fold_normalisation(conv, LUMA_MEAN, LUMA_STD, norm=None)
    x = torch.rand(1, 1, 32, 32)
    interior = _padding_free(conv, 32)
    with torch.no_grad():
        expected = conv((x - LUMA_MEAN[0]) / LUMA_STD[0])
        torch.testing.assert_close(gray(x)[..., interior], expected[..., interior], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "densenet121" else a
                                  for a in ARCHS])  # a DenseNet-121 alone takes seconds to build
def test_every_arch_builds_with_random_weights(arch: str) -> None:
    model = build_model(arch, 3, "none", num_sources=4).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits, feats = forward_with_features(model, x)
        sources = source_logits(model, feats, 1.0)
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    assert torch.equal(logits, model(x))
    assert feats.shape == (2, model.head.in_features)
    assert sources.shape == (2, 4)
    assert isinstance(model.cam_layer, nn.Module)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1


def test_unknown_arch_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown architecture 'vgg99'"):
        build_model("vgg99", 2, "none")
    missing = tmp_path / "missing.pth"
    with pytest.raises(ValueError, match="missing.pth: no such weights file"):
        build_model("alexnet", 2, str(missing))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read"):
        build_model("alexnet", 2, str(junk))
    _random_torchvision("resnet18", tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="resnet.pth: not a torchvision alexnet state dict"):
        build_model("alexnet", 2, str(tmp_path / "resnet.pth"))


def _block_downloads(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> list[str]:
    """Empty $TORCH_HOME and no network: every download attempt is recorded and fails like an offline machine."""
    attempts: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return attempts


def test_imagenet_weights_offline_raise_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = _block_downloads(monkeypatch, tmp_path)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("alexnet", 2, "imagenet")
    message = str(info.value)
    assert attempts and attempts[0].endswith(ALEXNET_FILE)
    assert "\n" not in message
    assert "--weights none" in message and "--weights PATH" in message and ALEXNET_FILE in message


def test_imagenet_weights_come_from_torch_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.hub verifies the hash prefix in the name only while downloading; a cached file is loaded as it is,
    # so a file of random weights under the official name is used (and nothing is downloaded).
    attempts = _block_downloads(monkeypatch, tmp_path)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    tv = _random_torchvision("alexnet", cache / ALEXNET_FILE)
    model = build_model("alexnet", 2, "imagenet")
    assert attempts == []
    torch.testing.assert_close(model.backbone.features[3].weight, tv.features[3].weight, atol=0, rtol=0)
    folded = (tv.features[0].weight / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(model.backbone.features[0].weight, folded)
    assert model.head.out_features == 2


def _meta(model: GrayClassifier, classes: list[str]) -> dict[str, object]:
    return {"arch": model.arch, "classes": classes, "image_size": 64, "epoch": 3, "val_auc": 0.9}


def test_checkpoint_round_trip_and_load_run(tmp_path: Path) -> None:
    model = build_model("resnet18", 2, "none", num_sources=3)
    optimizer = torch.optim.SGD(parameter_groups(model, 0.01, 0.1), momentum=0.9)
    model(torch.rand(2, 1, 64, 64)).sum().backward()
    optimizer.step()  # momentum buffers make the optimizer state non-trivial
    model.eval()
    meta = _meta(model, ["normal", "covid"])
    save_checkpoint(tmp_path / "model.pt", model, meta, {"optimizer": optimizer.state_dict()})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind

    ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["meta"]["num_sources"] == 3 and ckpt["meta"]["classes"] == ["normal", "covid"]
    fresh = torch.optim.SGD(parameter_groups(model, 0.01, 0.1), momentum=0.9)
    fresh.load_state_dict(ckpt["optimizer"])

    loaded, meta = load_run(tmp_path)
    assert meta["epoch"] == 3 and not loaded.training
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(
            loaded.source_logits(loaded.features(x), 1.0), model.source_logits(model.features(x), 1.0), atol=0, rtol=0
        )


def test_checkpoint_as_starting_weights_reuses_matching_heads_only(tmp_path: Path) -> None:
    model = build_model("alexnet", 2, "none")
    save_checkpoint(tmp_path / "model.pt", model, _meta(model, ["normal", "covid"]))
    same = build_model("alexnet", 2, str(tmp_path / "model.pt"))
    other = build_model("alexnet", 3, str(tmp_path / "model.pt"), num_sources=2)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(same.state_dict()[name], tensor, atol=0, rtol=0)
        if name.startswith("backbone."):
            torch.testing.assert_close(other.state_dict()[name], tensor, atol=0, rtol=0)
    assert other.head.out_features == 3 and other.source_head is not None
    with pytest.raises(ValueError, match="model.pt: checkpoint is for arch 'alexnet', not 'resnet18'"):
        build_model("resnet18", 2, str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match="not a covidcxr checkpoint"):
        torch.save({"weights": {}}, tmp_path / "plain.pt")
        load_checkpoint(tmp_path / "plain.pt")


def test_gradient_reversal_flips_and_scales_gradients() -> None:
    model = build_model("alexnet", 2, "none", num_sources=3)
    feats = torch.randn(4, model.head.in_features, requires_grad=True)
    (plain,) = torch.autograd.grad(model.source_head(feats).pow(2).sum(), feats)
    (reversed_,) = torch.autograd.grad(source_logits(model, feats, 0.5).pow(2).sum(), feats)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(reversed_, -0.5 * plain)
    # the source head's own parameters still learn to predict the source (no reversal for them)
    source_logits(model, feats, 0.5).pow(2).sum().backward()
    head_grad = model.source_head[0].weight.grad.clone()
    model.zero_grad()
    model.source_head(feats).pow(2).sum().backward()
    torch.testing.assert_close(head_grad, model.source_head[0].weight.grad)


def test_parameter_groups_split_backbone_and_heads() -> None:
    model = build_model("resnet18", 2, "none", num_sources=2)
    groups = {g["name"]: g for g in parameter_groups(model, 0.01, 0.1)}
    assert groups["backbone"]["lr"] == pytest.approx(0.001) and groups["heads"]["lr"] == 0.01
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    assert {id(p) for p in model.head.parameters()} <= {id(p) for p in groups["heads"]["params"]}


@pytest.mark.parametrize("size", [64, 112, 224])
def test_folding_the_pool_into_the_first_linear_layer_keeps_the_outputs(size: int) -> None:
    """At 112 px AlexNet's last map is 2 x 2 (64 px: 1 x 1); the folded model gives the same logits and features
    with a first linear layer 9 (36) times smaller; at 224 px (6 x 6) there is nothing to fold."""
    from covidcxr.model.network import fold_pooling
    torch.manual_seed(0)
    model = build_model("alexnet", 2, "none").eval()
    folded = fold_pooling(model, size)
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(folded.features(x), model.features(x), atol=1e-5, rtol=1e-5)
    n_fc1 = folded.backbone.classifier[1].weight.numel()
    assert n_fc1 == {64: 256 * 4096, 112: 1024 * 4096, 224: 9216 * 4096}[size]
    assert model.backbone.classifier[1].weight.numel() == 9216 * 4096  # the original is untouched
    assert folded.head is model.head  # shared, so a change to the head (e.g. a temperature) reaches both
