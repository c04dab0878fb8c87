"""Typed settings for every step, saved as JSON next to every result so each number can be traced back."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class IngestConfig:
    """How raw images become the manifest and the uint8 cache."""

    size: int = 256  # side of the square cached image
    workers: int = 0  # 0 = all cores
    layout: str = "auto"
    square: str = "pad"  # pad | squash | crop: how a non-square image becomes square (see cache.to_square)
    near_duplicate_corr: float = 0.95  # thumbnail correlation that makes two images copies
    conflict_duplicate_corr: float = 0.975  # the same, when their labels differ (look-alikes are not copies)


EQUALIZE_CHOICES = ("none", "global", "clahe")
CROP_CHOICES = ("none", "border", "lungs")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")


@dataclass
class AugmentConfig:
    """Batch augmentation applied on the device, on uint8 images from the cache."""

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06  # fraction of the image side
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.0  # log-uniform gamma jitter half-width, 0 = off
    blur: float = 0.0  # probability of a Gaussian blur
    noise: float = 0.0  # std of additive Gaussian noise (in [0, 1] units)
    resolution_jitter: float = 0.0  # probability of a down- then up-sample
    jpeg: float = 0.0  # probability of a JPEG re-compression (quality 30-90): web figures carry such artefacts
    # The deterministic steps below run at training and at evaluation alike, before the random ones.
    equalize: str = "global"  # none | global | clahe: per-image histogram equalization removes collection-specific
    # intensity curves (the mitigation that most improved cross-source AUC, docs/experiments); clahe equalizes
    # tile by tile, keeping local contrast (lung texture) that one global curve can flatten
    clahe_clip: float = 2.0  # CLAHE clip limit, in multiples of a tile's mean histogram bin (higher = stronger)
    crop: str = "none"  # none | border | lungs: crop each image to its content box trimmed by `border` (drops padding,
    # frames and the text and side markers near the edges), or to its lung box from `lung_model`; then squash back
    border: float = 0.08  # fraction of the content box's side trimmed from each edge by crop="border"
    lung_model: str = ""  # lung segmentation checkpoint (covidcxr lungs train) for crop="lungs"; a run keeps a copy
    hflip: bool = False  # off: the heart is on the left; flipping makes anatomy implausible

    def __post_init__(self) -> None:
        if isinstance(self.equalize, bool):  # configs saved before CLAHE stored a bool
            self.equalize = "global" if self.equalize else "none"
        _check_choice("equalize", self.equalize, EQUALIZE_CHOICES)
        _check_choice("crop", self.crop, CROP_CHOICES)
        if self.crop == "lungs" and not self.lung_model:
            raise ValueError("crop 'lungs' needs lung_model, a checkpoint written by `covidcxr lungs train`")
        if not 0.0 <= self.border < 0.5:
            raise ValueError(f"border {self.border} is not a fraction in [0, 0.5)")


@dataclass
class TrainConfig:
    """Everything that determines a training run."""

    data: str = ""
    out: str = ""
    arch: str = "alexnet"
    weights: str = "imagenet"  # imagenet | none | PATH
    task: str = "covid-vs-normal"
    image_size: int = 112  # model input side: CPU-friendly; 224 for the paper's resolution on a GPU
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.01  # new head; the pretrained layers use lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    patience: int = 5  # early stopping on validation AUC (from scratch, AUC creeps up for many epochs)
    checkpoint_every: int = 1  # epochs between checkpoints (always at the end); larger for short grid runs
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    holdout_sources: list[str] = field(default_factory=list)  # excluded from train/val (external test)
    max_train_images: int = 0  # 0 = all; subsample for quick grids
    balance: str = "class"  # class | source-class: how the sampler weights images
    domain_adversarial: float = 0.0  # weight of a gradient-reversal source head, 0 = off
    threshold_method: str = "youden"  # youden | sensitivity
    target_sensitivity: float = 0.95
    amp: bool = True  # bf16 autocast of training steps where the device has bf16 units; scoring is always float32
    compile: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, recursing into nested dataclasses; unknown keys are an error."""
    hints = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        default = hints[name].default_factory if hints[name].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(default, value)  # type: ignore[arg-type]
        elif isinstance(value, list) and isinstance(hints[name].default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def config_hash(obj: Any) -> str:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
