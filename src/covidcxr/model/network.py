"""Gray-input classifiers: a torchvision backbone whose first convolution takes one channel, a new head, and an
optional domain-adversarial source head. Where the starting weights come from is `model.weights`; saving and loading
runs is `model.checkpoint`.

Input contract: gray images in [0, 1], shape (B, 1, H, W). ImageNet's per-channel normalisation is folded into the
first convolution (see `model.weights.fold_normalisation`), so no normalisation step exists anywhere else.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from covidcxr.config import ARCH_CHOICES
from covidcxr.errors import InputError
from covidcxr.model.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUMA_MEAN,
    LUMA_STD,
    conv_like,
    fold_normalisation,
    imagenet_state_dict,
    is_checkpoint,
    load_file,
    short_error,
)

ARCHS = ARCH_CHOICES

SOURCE_HIDDEN = 256


@dataclass(frozen=True)
class _Spec:
    first_conv: str  # dotted path of the RGB input convolution
    first_norm: str | None  # BatchNorm right after it: receives the folded bias when the conv has none
    head: str  # dotted path of the last linear layer
    cam_layer: str  # last convolutional block: where Grad-CAM hooks


_SPECS = {
    # features.11 is the ReLU after the last conv (13x13 maps at 224 px); later layers only pool.
    "alexnet": _Spec("features.0", None, "classifier.6", "features.11"),
    "resnet18": _Spec("conv1", "bn1", "fc", "layer4"),
    "densenet121": _Spec("features.conv0", "features.norm0", "classifier", "features"),
    "efficientnet_b0": _Spec("features.0.0", "features.0.1", "classifier.1", "features"),
}

# Old torchvision DenseNet files name layers 'norm.1' where the modules are now 'norm1' (as torchvision remaps).
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class _GradientReversal(torch.autograd.Function):
    """Identity forward; gradient times -lambd backward (Ganin & Lempitsky), so the backbone unlearns the source."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:
        """The features unchanged: the source head sees what the class head sees."""
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The source loss's gradient reversed and scaled, so the backbone learns to hide the source."""
        return -ctx.lambd * grad, None


class GrayClassifier(nn.Module):
    """A torchvision backbone (its last linear layer replaced by Identity) + class head + optional source head.

    `features(x)` are the penultimate features; `forward(x)` returns class logits, or (logits, features) with
    `return_features=True` so that a DistributedDataParallel wrapper still sees one forward call.
    """

    __jit_unused_properties__ = ["cam_layer"]

    def __init__(self, arch: str, backbone: nn.Module, head: nn.Linear, num_sources: int = 0) -> None:
        super().__init__()
        self.arch = arch
        self.num_sources = num_sources
        self.backbone = backbone
        self.head = head
        self.source_head = (
            nn.Sequential(nn.Linear(head.in_features, SOURCE_HIDDEN), nn.ReLU(), nn.Linear(SOURCE_HIDDEN, num_sources))
            if num_sources > 0
            else None
        )

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional block, whose maps Grad-CAM weighs (it differs by architecture)."""
        return self.backbone.get_submodule(_SPECS[self.arch].cam_layer)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, for the guard's density and the source probe."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        """Class logits, or (logits, features) in one call, which DistributedDataParallel needs."""
        feats = self.backbone(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits

    def source_logits(self, features: torch.Tensor, lambd: float) -> torch.Tensor:
        """Source-head logits on gradient-reversed features (domain-adversarial training)."""
        if self.source_head is None:
            raise ValueError("this model has no source head (built with num_sources=0)")
        return self.source_head(_GradientReversal.apply(features, lambd))


def unwrap(model: nn.Module) -> GrayClassifier:
    """The GrayClassifier inside DistributedDataParallel and/or torch.compile wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
        assert isinstance(inner, nn.Module)  # what a wrapper holds (torch types a module's attributes Tensor | Module)
        model = inner
    if not isinstance(model, GrayClassifier):
        raise TypeError(f"expected a GrayClassifier, got {type(model).__name__}")
    return model


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits, penultimate features) in one forward call through any DDP / compile wrapper."""
    return model(x, return_features=True)


def source_logits(model: nn.Module, features: torch.Tensor, lambd: float) -> torch.Tensor:
    """Source-head logits on gradient-reversed features: minimising their loss makes the backbone hide the source."""
    return unwrap(model).source_logits(features, lambd)


@torch.no_grad()
def fold_pooling(model: nn.Module, image_size: int) -> nn.Module:
    """For scoring at one input side: AlexNet with its adaptive average pool folded into the first linear layer.

    At 112 px the last feature map is 2 x 2, which the pool only replicates to 6 x 6 before a 9216 x 4096 layer; the
    pool is linear, so the layer's weight can be pooled instead (its adjoint applied), giving a 1024 x 4096 layer with
    the same outputs up to float rounding. A one-image prediction reads every weight once, so this cuts the bytes read
    per image from ~228 MB to ~94 MB. Other architectures, and sizes whose map is 6 x 6 or larger, are returned as is.
    The folded model shares every other module (and so its memory) with `model`."""
    if not isinstance(model, GrayClassifier) or model.arch != "alexnet":
        return model
    net = model.backbone
    assert isinstance(net, torchvision.models.AlexNet)  # what build_model makes for arch "alexnet"
    channels, h, w = net.features(torch.zeros(1, 1, image_size, image_size)).shape[1:]
    if h * w >= 36:
        return model
    fc = net.classifier[1]
    # the pool as a matrix (each input cell's share of every output cell), then its adjoint: weight' = weight @ pool
    pool = nn.functional.adaptive_avg_pool2d(torch.eye(h * w).view(h * w, 1, h, w), net.avgpool.output_size)
    weight = fc.weight.view(fc.out_features, channels, -1) @ pool.view(h * w, -1).T
    folded = nn.utils.skip_init(nn.Linear, channels * h * w, fc.out_features)  # its weights are set just below
    folded.weight.copy_(weight.reshape(fc.out_features, -1))
    folded.bias.copy_(fc.bias)
    backbone = copy.copy(net)
    backbone._modules = dict(net._modules)  # a shallow copy shares the module dict; give it its own
    backbone.avgpool = nn.Identity()
    backbone.classifier = nn.Sequential(*(folded if i == 1 else m for i, m in enumerate(net.classifier)))
    return GrayClassifier(model.arch, backbone, model.head).eval()


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict[str, Any]]:
    """Optimizer groups: new heads at `lr`, the (pretrained) backbone at `lr * backbone_lr_scale`.

    With weights="none" nothing is pretrained; pass backbone_lr_scale=1 then.
    """
    m = unwrap(model)
    heads = [p for name, p in m.named_parameters() if not name.startswith("backbone.")]
    return [
        {"name": "backbone", "params": list(m.backbone.parameters()), "lr": lr * backbone_lr_scale},
        {"name": "heads", "params": heads, "lr": lr},
    ]


def build_model(arch: str, num_classes: int, weights: str = "imagenet", num_sources: int = 0) -> GrayClassifier:
    """A gray-input classifier. `weights`: "imagenet" (torchvision's, cached or downloaded), "none" (random), or
    PATH to a torchvision-format state dict (RGB first conv, converted like "imagenet") or a covidcxr checkpoint.

    A pretrained head is kept when it already has `num_classes` outputs, else a new one is made.
    """
    if arch not in _SPECS:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if weights == "none":
        return _random_gray(arch, num_classes, num_sources)
    if weights == "imagenet":
        return _from_torchvision(arch, imagenet_state_dict(arch), num_classes, num_sources, f"ImageNet {arch} weights")
    obj = load_file(weights)
    if is_checkpoint(obj):
        return _from_checkpoint(arch, obj, num_classes, num_sources, weights)
    return _from_torchvision(arch, obj, num_classes, num_sources, str(weights))


def _random_gray(arch: str, num_classes: int, num_sources: int) -> GrayClassifier:
    """Random weights; the fresh 1-channel first conv gets the luminance statistics folded in, so the input
    contract (raw gray in [0, 1]) is the same as for pretrained models."""
    tv = torchvision.models.get_model(arch, weights=None)
    rgb = tv.get_submodule(_SPECS[arch].first_conv)
    fresh = conv_like(rgb, in_channels=1)
    return _to_gray(arch, tv, fresh, LUMA_MEAN, LUMA_STD, num_classes, num_sources)


def _from_torchvision(
    arch: str, state_dict: dict[str, Any], num_classes: int, num_sources: int, origin: str
) -> GrayClassifier:
    """Convert an RGB torchvision state dict (ImageNet's or a file's) into a gray classifier."""
    tv = torchvision.models.get_model(arch, weights=None)
    state_dict = {_LEGACY_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state_dict.items()}
    try:
        tv.load_state_dict(state_dict)
    except RuntimeError as e:
        raise InputError(f"{origin}: not a torchvision {arch} state dict ({short_error(e)})") from None
    rgb = tv.get_submodule(_SPECS[arch].first_conv)
    return _to_gray(arch, tv, rgb, IMAGENET_MEAN, IMAGENET_STD, num_classes, num_sources)


def _from_checkpoint(
    arch: str, ckpt: dict[str, Any], num_classes: int, num_sources: int, path: str | Path
) -> GrayClassifier:
    """Start from a covidcxr checkpoint; its heads are reused where their shapes fit, else fresh ones are kept."""
    saved_arch = ckpt["meta"].get("arch")
    if saved_arch != arch:
        raise InputError(f"{path}: checkpoint is for arch {saved_arch!r}, not {arch!r}")
    model = _random_gray(arch, num_classes, num_sources)
    target = model.state_dict()
    usable = {k: v for k, v in ckpt["model"].items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k.startswith("backbone.") and k not in usable]
    if missing:
        raise InputError(f"{path}: checkpoint does not fit a gray {arch} (e.g. {missing[0]})")
    model.load_state_dict(usable, strict=False)
    return model


def _to_gray(
    arch: str,
    tv: nn.Module,
    conv: nn.Conv2d,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    num_sources: int,
) -> GrayClassifier:
    """Put a 1-channel conv with `mean`/`std` folded in where the first conv was, and split off the head."""
    spec = _SPECS[arch]
    norm = tv.get_submodule(spec.first_norm) if spec.first_norm else None
    assert norm is None or isinstance(norm, nn.BatchNorm2d)  # every _SPECS first_norm names a BatchNorm2d
    tv.set_submodule(spec.first_conv, fold_normalisation(conv, mean, std, norm))
    old_head = tv.get_submodule(spec.head)
    assert isinstance(old_head, nn.Linear)  # every _SPECS head names the model's last Linear
    head = old_head if old_head.out_features == num_classes else nn.Linear(old_head.in_features, num_classes)
    tv.set_submodule(spec.head, nn.Identity())
    return GrayClassifier(arch, tv, head, num_sources)
