"""The checks every settings dataclass runs in `__post_init__`, so bad settings fail when made, before any work starts.

A rule is (accepts the value?, what a valid value is); the CLI's argument types reuse the same rules, so a flag and a
YAML key are judged alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from covidcxr.errors import InputError

AUTO = "auto"  # image_size / weights: chosen when the run starts (see TrainConfig)

Rule = tuple[Callable[[Any], bool], str]  # (accepts the value?, what a valid value is)


def is_int(v: Any) -> bool:
    """An integer that is not a bool: True is an int to Python, but no count of epochs."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An int or a float that is not a bool, so a YAML `yes` is never read as 1."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE_INT: Rule = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
COUNT: Rule = (lambda v: is_int(v) and v >= 0, "an integer >= 0")
POSITIVE: Rule = (lambda v: is_number(v) and v > 0, "a number > 0")
NON_NEGATIVE: Rule = (lambda v: is_number(v) and v >= 0, "a number >= 0")
FRACTION: Rule = (lambda v: is_number(v) and 0 <= v <= 1, "a fraction in [0, 1]")
OPEN_FRACTION: Rule = (lambda v: is_number(v) and 0 < v < 1, "a fraction in (0, 1)")
SENSITIVITY: Rule = (lambda v: is_number(v) and 0 < v <= 1, "a fraction in (0, 1]")
IMAGE_SIZE: Rule = (lambda v: v == AUTO or (is_int(v) and v >= 32), "auto or an integer >= 32")
PORT: Rule = (lambda v: is_int(v) and 0 <= v <= 65535, "a port number in [0, 65535]")


def optional(rule: Rule) -> Rule:
    """The rule, or None: for settings whose absence means "not used" (no target sensitivity: Youden's J)."""
    accepts, what = rule
    return (lambda v: v is None or accepts(v), f"{what}, or unset")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """InputError unless `value` is one of `choices`, naming the setting and listing the choices."""
    if value not in choices:
        raise InputError(f"{name} {value!r} is not one of {', '.join(choices)}")


def check_rules(cfg: Any, rules: dict[str, Rule]) -> None:
    """InputError naming the first setting that breaks its rule, so bad settings fail before any work starts."""
    for name, (accepts, what) in rules.items():
        value = getattr(cfg, name)
        if not accepts(value):
            raise InputError(f"{type(cfg).__name__} setting {name} = {value!r} is invalid: it must be {what}")
