"""Settings of `covidcxr train`: the model, the recipe and the augmentation that determine a run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from covidcxr.config._rules import (
    AUTO,
    COUNT,
    FRACTION,
    IMAGE_SIZE,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SENSITIVITY,
    Rule,
    check_choice,
    check_rules,
    is_number,
)
from covidcxr.errors import InputError

EQUALIZE_CHOICES = ("none", "global", "clahe")
CROP_CHOICES = ("none", "border", "lungs")
ARCH_CHOICES = ("alexnet", "resnet18", "densenet121", "efficientnet_b0")  # backbones model.network can build
BALANCE_CHOICES = ("class", "source-class")
DATA_PATH_CHOICES = (AUTO, "memory", "stream")  # how training reads its images (training/feed.py)
OPTIMIZER_CHOICES = (AUTO, "sgd", "adamw")
THRESHOLD_CHOICES = ("youden", "youden-fit", "sensitivity")  # how an operating threshold is chosen (model/threshold.py)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
        """Check every setting when made (and read the bool `equalize` of configs saved before CLAHE)."""
        if isinstance(self.equalize, bool):  # configs saved before CLAHE stored a bool
            self.equalize = "global" if self.equalize else "none"
        check_rules(self, _AUGMENT_RULES)
        check_choice("equalize", self.equalize, EQUALIZE_CHOICES)
        check_choice("crop", self.crop, CROP_CHOICES)
        if self.crop == "lungs" and not self.lung_model:
            raise InputError("crop 'lungs' needs lung_model, a checkpoint written by `covidcxr lungs train`")
        if not 0.0 <= self.border < 0.5:
            raise InputError(f"border {self.border} is not a fraction in [0, 0.5)")


_AUGMENT_RULES: dict[str, Rule] = {
    "rotate_deg": NON_NEGATIVE,
    "scale": (lambda v: len(v) == 2 and all(is_number(x) and x > 0 for x in v) and v[0] <= v[1],
              "two numbers 0 < low <= high"),
    "translate": FRACTION, "brightness": NON_NEGATIVE, "contrast": NON_NEGATIVE, "gamma": NON_NEGATIVE,
    "blur": FRACTION, "noise": NON_NEGATIVE, "resolution_jitter": FRACTION, "jpeg": FRACTION, "clahe_clip": POSITIVE,
}


@dataclass
class GateSettings:
    """How a run's gate (covidcxr.trust.gate) is fitted, after training, on the run's own training films."""

    enabled: bool = True  # False (--no-gate): the run scores every image, whatever it shows
    negatives: str = ""  # a folder of lateral films, CT slices, ... to refuse (metadata.csv `kind`, or sub-folders)
    steps: int = 600
    batch_size: int = 96
    lr: float = 3e-3

    def __post_init__(self) -> None:
        check_rules(self, {"steps": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE})


@dataclass
class TrainConfig:
    """Everything that determines a training run."""

    data: str = ""
    out: str = ""
    arch: str = "alexnet"
    weights: str = AUTO  # auto (imagenet when it can be had, else none, with a warning) | imagenet | none | PATH
    task: str = "covid-vs-normal"
    image_size: int | str = AUTO  # model input side; auto: 224 (the paper's) on a GPU, 112 (CPU-friendly) on a CPU
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = AUTO  # auto: sgd when fine-tuning pretrained weights (the paper's), adamw from scratch | sgd |
    # adamw. SGD at lr 0.01 leaves a from-scratch AlexNet (no batch norm) near chance for many epochs: on the smaller
    # cross-source folds it ended at a training loss of 0.68 (ln 2 = 0.693), AdamW at adamw_lr reached 0.42
    lr: float = 0.01  # SGD: new head; the pretrained layers use lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    adamw_lr: float = 3e-4  # AdamW: every layer (the same scale rule as SGD's for pretrained layers)
    adamw_weight_decay: float = 0.05
    patience: int = 5  # early stopping on validation AUC (from scratch, AUC creeps up for many epochs)
    checkpoint_every: int = 1  # epochs between checkpoints (always at the end); larger for short grid runs
    checkpoint_steps: int = 0  # also checkpoint every this many steps within an epoch (0 = off): large data sets
    # have long epochs, and a run resumed from such a checkpoint ends with the weights of one never interrupted
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    holdout_sources: list[str] = field(default_factory=list)  # excluded from train/val (external test)
    split_files: list[str] = field(default_factory=list)  # a published split (e.g. COVIDx's train.txt, test.txt)
    # instead of covidcxr's own: each file's part is in its name (data/splits.py, read_split_files)
    data_path: str = AUTO  # auto | memory | stream: hold the images in memory, or stream them from the cache file;
    # auto: in memory while they fit (training/feed.py). Either gives the same weights
    max_train_images: int = 0  # 0 = all; subsample for quick grids
    balance: str = "class"  # class | source-class: how the sampler weights images
    domain_adversarial: float = 0.0  # weight of a gradient-reversal source head, 0 = off
    threshold_method: str = "youden"  # youden | youden-fit | sensitivity
    target_sensitivity: float = 0.95
    amp: bool = True  # bf16 autocast of training steps where the device has bf16 units; scoring is always float32
    compile: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    gate: GateSettings = field(default_factory=GateSettings)

    def __post_init__(self) -> None:
        """Check every setting when made: a bad one is one line, before any epoch runs."""
        check_rules(self, _TRAIN_RULES)
        check_choice("arch", self.arch, ARCH_CHOICES)
        check_choice("balance", self.balance, BALANCE_CHOICES)
        check_choice("data_path", self.data_path, DATA_PATH_CHOICES)
        if self.split_files and self.holdout_sources:
            raise InputError("split_files and holdout_sources both decide the test part; give one of them")
        check_choice("threshold_method", self.threshold_method, THRESHOLD_CHOICES)
        check_choice("optimizer", self.optimizer, OPTIMIZER_CHOICES)
        if not DEVICE_PATTERN.fullmatch(str(self.device)):
            raise InputError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")


_TRAIN_RULES: dict[str, Rule] = {
    "image_size": IMAGE_SIZE,
    "epochs": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE, "backbone_lr_scale": NON_NEGATIVE,
    "adamw_lr": POSITIVE, "adamw_weight_decay": NON_NEGATIVE,
    "momentum": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"), "weight_decay": NON_NEGATIVE,
    "patience": POSITIVE_INT, "checkpoint_every": POSITIVE_INT, "checkpoint_steps": COUNT, "seed": COUNT,
    "split_fractions": (lambda v: len(v) == 3 and all(FRACTION[0](x) for x in v) and abs(sum(v) - 1) < 1e-6,
                        "three fractions (train, val, test) that sum to 1"),
    "max_train_images": COUNT, "domain_adversarial": NON_NEGATIVE,
    "target_sensitivity": SENSITIVITY,
}
