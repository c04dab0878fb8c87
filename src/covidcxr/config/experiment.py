"""Settings of `covidcxr experiment`: a grid of TrainConfig overrides under the cross-source protocol, as written in
benchmarks/experiments/*.yaml. Every setting of the grid is checked when the grid is made: a typo must not cost a
grid's worth of training."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from covidcxr.config._io import from_dict, to_dict
from covidcxr.config._rules import COUNT, Rule, check_rules
from covidcxr.config.train import GateSettings, TrainConfig
from covidcxr.errors import InputError

REQUIRED_KEYS = ("data", "settings")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` on top, nested mappings merged key by key (an augment override keeps the rest)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class ExperimentConfig:
    """A grid: each named setting (TrainConfig overrides on top of `base`) is trained per seed and per fold."""

    data: str  # ingested data folder
    settings: dict[str, dict[str, Any] | None]  # setting name -> TrainConfig overrides (None or {}: base alone)
    base: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides shared by every setting
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_task: str = "covid-vs-normal"  # every run is scored on this task's images, so settings compare
    folds: list[str] = field(default_factory=list)  # external folds ("+"-joined sources) to run; empty: all
    keep_checkpoints: bool = True  # off: model.pt and last.pt are deleted once scored (a large grid fills a disk)

    def __post_init__(self) -> None:
        """Check the grid and build every setting's TrainConfig once, so a typo fails before training."""
        self.folds = list(self.folds or [])
        if not isinstance(self.settings, dict) or not self.settings:
            raise InputError("settings must map setting names to TrainConfig overrides")
        check_rules(self, _EXPERIMENT_RULES)
        for name in self.settings:
            self.train_config(name)

    @classmethod
    def from_mapping(cls, spec: dict[str, Any]) -> ExperimentConfig:
        """The grid from a YAML mapping; missing and unknown keys are named in one message, with the known ones."""
        known = sorted(f.name for f in fields(cls))
        missing, unknown = set(REQUIRED_KEYS) - set(spec), set(spec) - set(known)
        if missing or unknown:
            problems = [f"missing key(s) {', '.join(sorted(missing))}"] if missing else []
            if unknown:
                problems.append(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(known)})")
            raise InputError("; ".join(problems))
        return cls(**spec)

    def train_config(self, name: str) -> TrainConfig:
        """Setting `name` as a TrainConfig: defaults <- base <- its overrides; a bad override names the setting."""
        # grid runs are compared on the same images, so they fit no gate unless a setting asks for one
        values = merge(merge(to_dict(TrainConfig(gate=GateSettings(enabled=False))), self.base),
                       self.settings[name] or {})
        try:
            return from_dict(TrainConfig, values)
        except (ValueError, TypeError) as exc:
            raise InputError(f"setting {name!r}: {exc}") from None


_EXPERIMENT_RULES: dict[str, Rule] = {
    "seeds": (lambda v: isinstance(v, list) and len(v) > 0 and all(COUNT[0](s) for s in v),
              "a non-empty list of integers >= 0"),
    "folds": (lambda v: all(isinstance(f, str) for f in v), "a list of fold names"),
    "keep_checkpoints": (lambda v: isinstance(v, bool), "true or false"),
    "base": (lambda v: isinstance(v, dict), "a mapping of TrainConfig settings"),
}
