"""Gray-input classifiers: a torchvision backbone whose first convolution takes one channel, a new head, and an
optional domain-adversarial source head; checkpoints that hold plain values only.

Input contract: gray images in [0, 1], shape (B, 1, H, W). ImageNet's per-channel normalisation is folded into the
first convolution (see `_fold_normalisation`), so no normalisation step exists anywhere else.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import socket
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from covidcxr.config import ARCH_CHOICES
from covidcxr.errors import CovidcxrWarning, InputError, MissingInputError, WeightsUnavailableError

ARCHS = ARCH_CHOICES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)
# For random first layers: the same normalisation a gray (luminance) image gets from ImageNet's statistics.
LUMA_MEAN = (sum(w * m for w, m in zip(_LUMA, IMAGENET_MEAN)),)
LUMA_STD = (sum(w * s for w, s in zip(_LUMA, IMAGENET_STD)),)

DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation, so an offline machine fails fast instead of hanging
SOURCE_HIDDEN = 256


LUNG_MODEL = "lungs.pt"  # a run's copy of the lung model its crop="lungs" preprocessing uses


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
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
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
        return self.backbone.get_submodule(_SPECS[self.arch].cam_layer)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> Any:
        feats = self.backbone(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits

    def source_logits(self, features: torch.Tensor, lambd: float) -> torch.Tensor:
        if self.source_head is None:
            raise ValueError("this model has no source head (built with num_sources=0)")
        return self.source_head(_GradientReversal.apply(features, lambd))


def unwrap(model: nn.Module) -> GrayClassifier:
    """The GrayClassifier inside DistributedDataParallel and/or torch.compile wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
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
def fold_pooling(model: GrayClassifier, image_size: int) -> GrayClassifier:
    """For scoring at one input side: AlexNet with its adaptive average pool folded into the first linear layer.

    At 112 px the last feature map is 2 x 2, which the pool only replicates to 6 x 6 before a 9216 x 4096 layer; the
    pool is linear, so the layer's weight can be pooled instead (its adjoint applied), giving a 1024 x 4096 layer with
    the same outputs up to float rounding. A one-image prediction reads every weight once, so this cuts the bytes read
    per image from ~228 MB to ~94 MB. Other architectures, and sizes whose map is 6 x 6 or larger, are returned as is.
    The folded model shares every other module (and so its memory) with `model`."""
    if not isinstance(model, GrayClassifier) or model.arch != "alexnet":
        return model
    net = model.backbone
    channels, h, w = net.features(torch.zeros(1, 1, image_size, image_size)).shape[1:]
    if h * w >= 36:
        return model
    fc = net.classifier[1]
    with torch.enable_grad():  # the adjoint of the pool, by autograd: weight' = pool^T(weight)
        grid = torch.zeros(fc.out_features, channels, h, w, requires_grad=True)
        pooled = nn.functional.adaptive_avg_pool2d(grid, net.avgpool.output_size)
        (weight,) = torch.autograd.grad(pooled, grid, grad_outputs=fc.weight.view(pooled.shape))
    folded = nn.Linear(channels * h * w, fc.out_features)
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
        return _from_torchvision(arch, _imagenet_state_dict(arch), num_classes, num_sources, f"ImageNet {arch} weights")
    obj = _load_file(weights)
    if _is_checkpoint(obj):
        return _from_checkpoint(arch, obj, num_classes, num_sources, weights)
    return _from_torchvision(arch, obj, num_classes, num_sources, str(weights))


def resolve_weights(weights: str, arch: str) -> tuple[str, str | None]:
    """'auto' -> ("imagenet", None) when torchvision's weights are cached or downloadable, else ("none", note) with
    the note also issued as a warning, so a new user offline gets a run (flagged as not transfer learning) instead of
    an error. Any other value is returned as it is; "imagenet" stays strict in `build_model`."""
    if weights != "auto":
        return weights, None
    try:
        _imagenet_weights_file(arch)
        return "imagenet", None
    except WeightsUnavailableError as exc:
        note = (f"weights auto: {exc}. Training from random initialisation instead, so the result is NOT transfer "
                "learning (--weights imagenet insists on ImageNet weights)")
        warnings.warn(note, CovidcxrWarning, stacklevel=2)
        return "none", note


def _random_gray(arch: str, num_classes: int, num_sources: int) -> GrayClassifier:
    """Random weights; the fresh 1-channel first conv gets the luminance statistics folded in, so the input
    contract (raw gray in [0, 1]) is the same as for pretrained models."""
    tv = torchvision.models.get_model(arch, weights=None)
    rgb = tv.get_submodule(_SPECS[arch].first_conv)
    fresh = _conv_like(rgb, in_channels=1)
    return _to_gray(arch, tv, fresh, LUMA_MEAN, LUMA_STD, num_classes, num_sources)


def _from_torchvision(
    arch: str, state_dict: dict[str, Any], num_classes: int, num_sources: int, origin: str
) -> GrayClassifier:
    tv = torchvision.models.get_model(arch, weights=None)
    state_dict = {_LEGACY_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state_dict.items()}
    try:
        tv.load_state_dict(state_dict)
    except RuntimeError as e:
        raise InputError(f"{origin}: not a torchvision {arch} state dict ({_one_line(e)})") from None
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
    tv.set_submodule(spec.first_conv, _fold_normalisation(conv, mean, std, norm))
    old_head = tv.get_submodule(spec.head)
    head = old_head if old_head.out_features == num_classes else nn.Linear(old_head.in_features, num_classes)
    tv.set_submodule(spec.head, nn.Identity())
    return GrayClassifier(arch, tv, head, num_sources)


@torch.no_grad()
def _fold_normalisation(
    conv: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...], norm: nn.BatchNorm2d | None
) -> nn.Conv2d:
    """A 1-channel conv whose output on raw gray x equals `conv`'s on x replicated and normalised per channel.

    conv(sum_c (x - m_c) / s_c * W_c) = (sum_c W_c / s_c) * x - shift, shift = sum_c (m_c / s_c) * sum(W_c):
    the weight becomes sum_c W_c / s_c and `shift` is taken off the bias. Convs without a bias (resnet,
    densenet, efficientnet) are followed by a BatchNorm, whose running_mean absorbs the shift instead
    (BN(y - shift) with mean mu is BN(y) with mean mu + shift). That keeps torchvision's module layout with
    no extra parameter, and is exact in eval mode; in train mode BN's batch statistics cancel any constant.
    Only pixels whose receptive field reaches the zero padding differ (gray pads 0, RGB pads normalised 0).
    """
    weight = conv.weight.detach().float()
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    ratio = (torch.tensor(mean) / torch.tensor(std)).view(1, -1)
    shift = (weight.sum(dim=(2, 3)) * ratio).sum(dim=1)
    gray = _conv_like(conv, in_channels=1)
    gray.weight.copy_((weight / std_t).sum(dim=1, keepdim=True))
    if conv.bias is not None:
        gray.bias.copy_(conv.bias - shift)
    elif norm is not None:
        norm.running_mean += shift
    else:
        raise ValueError("first conv has neither a bias nor a following BatchNorm to absorb the normalisation")
    return gray


def _conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    )


def _imagenet_state_dict(arch: str) -> dict[str, Any]:
    """torchvision's ImageNet weights from $TORCH_HOME/hub/checkpoints, downloading (hash-checked) if absent.

    torch.hub checks the hash prefix in the file name only while downloading; a file already in the cache is
    loaded as it is.
    """
    weights = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"]
    filename = os.path.basename(urlparse(weights.url).path)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as e:  # URLError, timeouts, refused connections
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not in {cache} and could not be downloaded ({_one_line(e)}); "
            f"use --weights none to train from scratch, or --weights PATH with a downloaded {filename} placed anywhere"
        ) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise InputError(f"ImageNet weights file {filename} for {arch} is unusable: {_one_line(e)}") from None


def _imagenet_weights_file(arch: str) -> Path:
    """The cached ImageNet weights file, downloaded first when absent (without loading a cached one)."""
    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not path.is_file():
        _imagenet_state_dict(arch)
    return path


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torch.hub opens URLs without a timeout; bound it for the duration of the call."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if old is None else old)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _load_file(path: str | Path) -> dict[str, Any]:
    """A dict saved by torch.save; anything else (a text file, a bare tensor) is an InputError naming the file."""
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: no such weights file (use --weights imagenet, none or PATH)")
    if not _saved_by_torch(Path(path)):  # torch.load fails on other files with any exception type at all
        raise InputError(f"{path}: cannot read as PyTorch weights (not a file torch.save wrote; expected a state "
                         "dict or covidcxr checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise InputError(f"{path}: cannot read as PyTorch weights ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict or covidcxr checkpoint")
    return obj


def _saved_by_torch(path: Path) -> bool:
    """torch.save's formats: a zip archive (torch >= 1.6) or, legacy (e.g. torchvision's older weight files),
    a pickle, whose first byte is the PROTO opcode."""
    with open(path, "rb") as fh:
        return fh.read(1) == pickle.PROTO or zipfile.is_zipfile(fh)


def _is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("meta"), dict)


def _one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (load_state_dict errors span lines and list every key)."""
    line = " ".join(str(e).split()) or type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: dict[str, Any], extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write {"model": state_dict, "meta": meta, **extra} atomically (temp file + rename).

    `meta` gains the model's `arch` and `num_sources`, which `load_run` needs to rebuild it. `state_dict` replaces the
    model's current weights (e.g. the best epoch's, kept in memory by the training loop).
    """
    m = unwrap(model)
    if meta.get("arch", m.arch) != m.arch:
        raise ValueError(f"meta says arch {meta['arch']!r} but the model is {m.arch!r}")
    clash = {"model", "meta"} & set(extra or {})
    if clash:
        raise ValueError(f"extra checkpoint entries may not be named {', '.join(sorted(clash))}")
    payload = {"model": state_dict if state_dict is not None else m.state_dict(), "meta": {**meta, "arch": m.arch, "num_sources": m.num_sources}, **(extra or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, tensors on the CPU."""
    obj = _load_file(path)
    if not _is_checkpoint(obj):
        raise InputError(f"{path}: not a covidcxr checkpoint (no 'model' and 'meta' entries)")
    return obj


def load_run(
    run_dir: str | Path, which: str = "model.pt", device: str | torch.device = "cpu"
) -> tuple[GrayClassifier, dict[str, Any]]:
    """The model saved in a run folder, in eval mode on `device`, and its meta."""
    path = Path(run_dir) / which
    if not path.is_file():
        raise MissingInputError(f"{run_dir}: not a covidcxr run folder (no {which}); covidcxr train writes one")
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    try:
        model = build_model(meta["arch"], len(meta["classes"]), "none", int(meta.get("num_sources", 0)))
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise InputError(f"{path}: checkpoint does not match its meta ({_one_line(e)})") from None
    if meta.get("augment", {}).get("crop") == "lungs":  # score with the run's copy of its lung model
        meta["augment"]["lung_model"] = str(Path(run_dir) / LUNG_MODEL)
    return model.to(device).eval(), meta
