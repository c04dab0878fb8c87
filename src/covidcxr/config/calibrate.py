"""Settings of `covidcxr calibrate`: how a run may be adapted to a site with some of the site's labelled images."""

from __future__ import annotations

from dataclasses import dataclass

from covidcxr.config._rules import (
    COUNT,
    FRACTION,
    OPEN_FRACTION,
    POSITIVE,
    POSITIVE_INT,
    SENSITIVITY,
    Rule,
    check_rules,
    optional,
)
from covidcxr.config.validate import ValidateSettings
from covidcxr.errors import InputError

# What calibrate may change, simplest first: nothing; the threshold; temperature and threshold; the head (fine-tuned,
# then temperature and threshold); all layers (likewise)
CANDIDATE_CHOICES = ("nothing", "threshold", "temperature", "head", "all")


@dataclass
class CalibrateSettings:
    """Which of the site's images may adapt the run, what may change and how it is chosen; saved in calibration.json
    so a result can be traced."""

    fraction: float = 0.3  # share of the site's patients used to adapt; the rest is held back to measure
    candidates: tuple[str, ...] = CANDIDATE_CHOICES  # what may change; "nothing" is always among them
    folds: int = 5  # patient-grouped cross-validation folds inside the calibration images
    finetune_epochs: int = 20  # passes over the calibration images of the head / all candidates
    lr: float = 0.001  # fine-tuning's SGD (momentum 0.9): 0.01 moved a trained model too far on a few hundred films
    batch_size: int = 32  # AlexNet's 58M classifier weights make each step cost much the same at 16 or 32 images
    target_sensitivity: float | None = None  # None: the threshold aims at min_sensitivity / min_specificity
    min_sensitivity: float = ValidateSettings.min_sensitivity  # the site's requirements, validate's defaults: the
    min_specificity: float = ValidateSettings.min_specificity  # threshold clears both by the widest common margin
    n_images: int | None = None  # exactly this many calibration images instead of `fraction` (measurements)
    max_held_back: int | None = None  # measure on at most this many held-back images (the rest unused; time)
    seed: int = 0
    n_boot: int = 1000  # bootstrap resamples: the noise of a candidate's gain, the before/after CIs
    triage: bool = False  # also set rule-out / rule-in thresholds with a guarantee
    npv: float = 0.95  # triage: promised NPV of rule-out
    ppv: float = 0.90  # triage: promised PPV of rule-in
    confidence: float = 0.9  # triage: probability that each promise holds

    def __post_init__(self) -> None:
        """Check every setting when made: a bad one is one line, before any image is read."""
        self.candidates = tuple(self.candidates)
        check_rules(self, _CALIBRATE_RULES)
        unknown = [c for c in self.candidates if c not in CANDIDATE_CHOICES]
        if unknown:
            raise InputError(f"candidates: unknown {', '.join(unknown)}; use some of {', '.join(CANDIDATE_CHOICES)}")
        if self.folds < 2:
            raise InputError(f"folds must be at least 2, got {self.folds}")

    @property
    def threshold_method(self) -> str:
        """The site's threshold: for the target sensitivity when one is set, else where sensitivity and specificity
        clear the site's requirements by the widest common margin (model/threshold.py)."""
        return "sensitivity" if self.target_sensitivity is not None else "requirements"


_CALIBRATE_RULES: dict[str, Rule] = {
    "fraction": OPEN_FRACTION, "folds": POSITIVE_INT, "finetune_epochs": COUNT, "lr": POSITIVE,
    "batch_size": POSITIVE_INT, "target_sensitivity": optional(SENSITIVITY),
    "min_sensitivity": FRACTION, "min_specificity": FRACTION, "n_images": optional(POSITIVE_INT),
    "max_held_back": optional(POSITIVE_INT), "seed": COUNT, "n_boot": POSITIVE_INT, "npv": OPEN_FRACTION,
    "ppv": OPEN_FRACTION, "confidence": OPEN_FRACTION,
}
