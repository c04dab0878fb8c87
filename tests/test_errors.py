"""The error classes: every expected failure is a CovidcxrError (the CLI's one line, exit 2) and still the built-in
exception its callers caught before; settings are checked when they are made, naming the setting."""

from __future__ import annotations

import dataclasses

import pytest

from covidcxr.config import AugmentConfig, CalibrateSettings, IngestConfig, TrainConfig
from covidcxr.errors import (
    CovidcxrError,
    ExportParityError,
    ImageReadError,
    InputError,
    LeakageError,
    MissingInputError,
    PortInUseError,
    RunExistsError,
    WeightsUnavailableError,
    one_line,
)


@pytest.mark.parametrize("cls, builtin", [
    (InputError, ValueError), (MissingInputError, FileNotFoundError), (RunExistsError, FileExistsError),
    (ImageReadError, ValueError), (WeightsUnavailableError, RuntimeError), (LeakageError, AssertionError),
    (ExportParityError, RuntimeError), (PortInUseError, OSError),
], ids=lambda c: c.__name__)
def test_expected_failures_are_covidcxr_errors_and_keep_their_builtin_base(cls, builtin):
    exc = cls("x.png", "reason") if cls is ImageReadError else cls("x.png: reason")
    assert isinstance(exc, CovidcxrError) and isinstance(exc, builtin)
    assert str(exc) == "x.png: reason"


def test_one_line_folds_library_messages():
    assert one_line(ValueError("a\n  b\tc ")) == "a b c"
    assert one_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("cls, setting, value, says", [
    (TrainConfig, "batch_size", 0, "an integer >= 1"),
    (TrainConfig, "epochs", 0, "an integer >= 1"),
    (TrainConfig, "epochs", 2.5, "an integer >= 1"),
    (TrainConfig, "patience", 0, "an integer >= 1"),
    (TrainConfig, "lr", -1.0, "a number > 0"),
    (TrainConfig, "momentum", 1.0, "[0, 1)"),
    (TrainConfig, "image_size", 8, "auto or an integer >= 32"),
    (TrainConfig, "split_fractions", (0.7, 0.2, 0.2), "sum to 1"),
    (TrainConfig, "target_sensitivity", 0.0, "(0, 1]"),
    (TrainConfig, "balance", "hospital", "class, source-class"),
    (TrainConfig, "arch", "vgg16", "alexnet"),
    (TrainConfig, "device", "gpu", "cuda:N"),
    (AugmentConfig, "blur", 1.5, "a fraction in [0, 1]"),
    (AugmentConfig, "scale", (1.1, 0.9), "0 < low <= high"),
    (IngestConfig, "size", 0, "an integer >= 1"),
    (IngestConfig, "square", "circle", "pad, squash, crop"),
    (CalibrateSettings, "fraction", 0.0, "(0, 1)"),
    (CalibrateSettings, "fraction", 1.0, "(0, 1)"),
    (CalibrateSettings, "finetune_epochs", -1, "an integer >= 0"),
    (CalibrateSettings, "candidates", ("middle",), "nothing, threshold, temperature, head, all"),
    (CalibrateSettings, "target_sensitivity", 0.0, "(0, 1], or unset"),
    (CalibrateSettings, "n_images", 0, "an integer >= 1, or unset"),
    (CalibrateSettings, "n_boot", 0, "an integer >= 1"),
], ids=lambda v: str(v) if not isinstance(v, type) else v.__name__)
def test_bad_settings_fail_when_made_naming_the_setting(cls, setting, value, says):
    with pytest.raises(InputError) as err:
        cls(**{setting: value})
    assert setting in str(err.value) and says in str(err.value)


def test_defaults_and_replace_are_validated():
    cfg = TrainConfig()
    assert (cfg.weights, cfg.image_size) == ("auto", "auto")
    with pytest.raises(InputError, match="batch_size"):
        dataclasses.replace(cfg, batch_size=-3)
