"""The settings that fix preprocessing, apart from the torch code that applies them (`transform.py`), so that a
process without torch (the service on onnxruntime) can read a run's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from covidcxr.config import SQUARE_CHOICES, AugmentConfig, from_dict
from covidcxr.errors import InputError


@dataclass(frozen=True)
class PreprocessSpec:
    """The settings that fix preprocessing; a run stores them in its checkpoint's meta."""

    square: str = "pad"
    cache_size: int = 256
    image_size: int = 112
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.square not in SQUARE_CHOICES:
            raise InputError(f"unknown square mode {self.square!r}; choose one of {', '.join(SQUARE_CHOICES)}")

    @classmethod
    def from_meta(cls, meta: dict) -> "PreprocessSpec":
        return cls(meta.get("square", "pad"), int(meta["cache_size"]), int(meta["image_size"]),
                   from_dict(AugmentConfig, dict(meta["augment"])))
