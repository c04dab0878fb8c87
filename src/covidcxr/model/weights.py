"""Where a gray model's starting weights come from, kept apart from the architecture so that it can be tested (and
fail offline) on its own: torchvision's ImageNet weights, cached or downloaded with a socket timeout; a weights file
given by path, read without unpickling code; and the folding of ImageNet's mean and std into a one-channel first
convolution, which is what lets RGB weights take raw gray images in [0, 1].
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from covidcxr.errors import CovidcxrWarning, InputError, MissingInputError, WeightsUnavailableError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)
# For random first layers: the same normalisation a gray (luminance) image gets from ImageNet's statistics.
LUMA_MEAN = (sum(w * m for w, m in zip(_LUMA, IMAGENET_MEAN)),)
LUMA_STD = (sum(w * s for w, s in zip(_LUMA, IMAGENET_STD)),)

DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation, so an offline machine fails fast instead of hanging


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


def imagenet_state_dict(arch: str) -> dict[str, Any]:
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
            f"ImageNet weights for {arch} are not in {cache} and could not be downloaded ({short_error(e)}); "
            f"use --weights none to train from scratch, or --weights PATH with a downloaded {filename} placed anywhere"
        ) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise InputError(f"ImageNet weights file {filename} for {arch} is unusable: {short_error(e)}") from None


def _imagenet_weights_file(arch: str) -> Path:
    """The cached ImageNet weights file, downloaded first when absent (without loading a cached one)."""
    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not path.is_file():
        imagenet_state_dict(arch)
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


@torch.no_grad()
def fold_normalisation(
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
    gray = conv_like(conv, in_channels=1)
    gray.weight.copy_((weight / std_t).sum(dim=1, keepdim=True))
    if conv.bias is not None:
        assert gray.bias is not None  # conv_like gives `gray` a bias exactly when `conv` has one
        gray.bias.copy_(conv.bias - shift)
    elif norm is not None:
        assert norm.running_mean is not None  # the BatchNorms of torchvision's models track running statistics
        norm.running_mean += shift
    else:
        raise ValueError("first conv has neither a bias nor a following BatchNorm to absorb the normalisation")
    return gray


def conv_like(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh conv shaped like `conv` but for `in_channels` inputs: the gray first layer's frame."""
    # torch types a conv's settings tuple[int, ...] for every dimension count; a Conv2d's hold two
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        cast("tuple[int, int]", conv.kernel_size),
        stride=cast("tuple[int, int]", conv.stride),
        padding=cast("str | tuple[int, int]", conv.padding),
        dilation=cast("tuple[int, int]", conv.dilation),
        bias=conv.bias is not None,
    )


def load_file(path: str | Path) -> dict[str, Any]:
    """A dict saved by torch.save; anything else (a text file, a bare tensor) is an InputError naming the file."""
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: no such weights file (use --weights imagenet, none or PATH)")
    if not _saved_by_torch(Path(path)):  # torch.load fails on other files with any exception type at all
        raise InputError(f"{path}: cannot read as PyTorch weights (not a file torch.save wrote; expected a state "
                         "dict or covidcxr checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise InputError(f"{path}: cannot read as PyTorch weights ({short_error(e)})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict or covidcxr checkpoint")
    return obj


def _saved_by_torch(path: Path) -> bool:
    """torch.save's formats: a zip archive (torch >= 1.6) or, legacy (e.g. torchvision's older weight files),
    a pickle, whose first byte is the PROTO opcode."""
    with open(path, "rb") as fh:
        return fh.read(1) == pickle.PROTO or zipfile.is_zipfile(fh)


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a covidcxr checkpoint ({"model": ..., "meta": ...}) rather than a bare state dict."""
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("meta"), dict)


def short_error(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line: load_state_dict errors span lines and list every key."""
    line = one_line(e)
    return line if len(line) <= limit else line[: limit - 3] + "..."
