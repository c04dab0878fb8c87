"""Settings of `covidcxr ingest`: how raw images become the manifest and the uint8 cache."""

from __future__ import annotations

from dataclasses import dataclass

from covidcxr.config._rules import COUNT, FRACTION, POSITIVE_INT, check_choice, check_rules

SQUARE_CHOICES = ("pad", "squash", "crop")


@dataclass
class IngestConfig:
    """How raw images become the manifest and the uint8 cache."""

    size: int = 256  # side of the square cached image
    workers: int = 0  # 0 = all cores
    layout: str = "auto"
    square: str = "pad"  # pad | squash | crop: how a non-square image becomes square (see cache.to_square)
    near_duplicate_corr: float = 0.95  # thumbnail correlation that makes two images copies
    conflict_duplicate_corr: float = 0.975  # the same, when their labels differ (look-alikes are not copies)

    def __post_init__(self) -> None:
        """Check every setting when made: a bad one is one line, before any image is decoded."""
        check_rules(self, {"size": POSITIVE_INT, "workers": COUNT, "near_duplicate_corr": FRACTION,
                           "conflict_duplicate_corr": FRACTION})
        check_choice("square", self.square, SQUARE_CHOICES)
