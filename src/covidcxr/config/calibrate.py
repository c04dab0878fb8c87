"""Settings of `covidcxr calibrate`: how a run is adapted to a site with some of the site's labelled images."""

from __future__ import annotations

from dataclasses import dataclass

from covidcxr.config._rules import (
    COUNT,
    OPEN_FRACTION,
    POSITIVE,
    POSITIVE_INT,
    SENSITIVITY,
    Rule,
    check_choice,
    check_rules,
    optional,
)

LAYER_CHOICES = ("head", "all")  # which layers fine-tuning changes


@dataclass
class CalibrateSettings:
    """Which of the site's images adapt the run and how; saved in calibration.json so a result can be traced."""

    fraction: float = 0.3  # share of the site's patients used to adapt; the rest is held back to measure
    finetune_epochs: int = 10  # passes over the fine-tune images; 0: threshold and temperature only
    layers: str = "head"  # head | all: which layers fine-tuning changes
    lr: float = 0.01
    batch_size: int = 16
    target_sensitivity: float | None = None  # None: Youden's J on the tune images
    n_images: int | None = None  # exactly this many calibration images instead of `fraction` (measurements)
    max_held_back: int | None = None  # measure on at most this many held-back images (the rest unused; time)
    seed: int = 0
    n_boot: int = 1000  # bootstrap resamples for the before/after CIs

    def __post_init__(self) -> None:
        """Check every setting when made: a bad one is one line, before any image is read."""
        check_rules(self, _CALIBRATE_RULES)
        check_choice("layers", self.layers, LAYER_CHOICES)

    @property
    def threshold_method(self) -> str:
        """The site's threshold: for the target sensitivity when one is set, else Youden's J."""
        return "sensitivity" if self.target_sensitivity is not None else "youden"


_CALIBRATE_RULES: dict[str, Rule] = {
    "fraction": OPEN_FRACTION, "finetune_epochs": COUNT, "lr": POSITIVE, "batch_size": POSITIVE_INT,
    "target_sensitivity": optional(SENSITIVITY), "n_images": optional(POSITIVE_INT),
    "max_held_back": optional(POSITIVE_INT), "seed": COUNT, "n_boot": POSITIVE_INT,
}
