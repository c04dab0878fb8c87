"""Typed settings for every step, validated when made and saved as JSON next to every result, so each number can be
traced back to the settings that made it. One module per command's settings; the rules and the I/O are shared."""

from covidcxr.config._io import config_hash, from_dict, read_yaml, save_json, to_dict
from covidcxr.config._rules import (
                                    AUTO,
                                    COUNT,
                                    FRACTION,
                                    IMAGE_SIZE,
                                    NON_NEGATIVE,
                                    OPEN_FRACTION,
                                    PORT,
                                    POSITIVE,
                                    POSITIVE_INT,
                                    SENSITIVITY,
                                    Rule,
)
from covidcxr.config.calibrate import CANDIDATE_CHOICES, CalibrateSettings
from covidcxr.config.experiment import ExperimentConfig
from covidcxr.config.ingest import SQUARE_CHOICES, IngestConfig
from covidcxr.config.monitor import MonitorConfig, parse_window
from covidcxr.config.serve import (
                                    ENGINES,
                                    MAX_BATCH,
                                    MAX_UPLOAD_BYTES,
                                    MAX_WAIT_MS,
                                    REQUEST_THREADS,
                                    SERVE_THREADS,
                                    SHIFT_BATCH,
                                    ServeConfig,
)
from covidcxr.config.train import (
                                    ARCH_CHOICES,
                                    BALANCE_CHOICES,
                                    CROP_CHOICES,
                                    DEVICE_PATTERN,
                                    EQUALIZE_CHOICES,
                                    OPTIMIZER_CHOICES,
                                    THRESHOLD_CHOICES,
                                    AugmentConfig,
                                    GateSettings,
                                    TrainConfig,
)
from covidcxr.config.validate import ValidateSettings

__all__ = [
    # settings
    "AugmentConfig", "CalibrateSettings", "ExperimentConfig", "GateSettings", "IngestConfig", "MonitorConfig",
    "ServeConfig", "TrainConfig", "ValidateSettings",
    # in and out
    "config_hash", "from_dict", "parse_window", "read_yaml", "save_json", "to_dict",
    # rules, shared with the CLI's argument types
    "AUTO", "COUNT", "FRACTION", "IMAGE_SIZE", "NON_NEGATIVE", "OPEN_FRACTION", "PORT", "POSITIVE", "POSITIVE_INT",
    "SENSITIVITY", "Rule",
    # choices and defaults
    "ARCH_CHOICES", "BALANCE_CHOICES", "CROP_CHOICES", "DEVICE_PATTERN", "ENGINES", "EQUALIZE_CHOICES",
    "CANDIDATE_CHOICES", "MAX_BATCH", "MAX_UPLOAD_BYTES", "MAX_WAIT_MS", "REQUEST_THREADS", "SERVE_THREADS",
    "OPTIMIZER_CHOICES", "SHIFT_BATCH", "SQUARE_CHOICES", "THRESHOLD_CHOICES",
]
