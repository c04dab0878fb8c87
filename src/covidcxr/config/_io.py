"""Settings in and out: dataclass <-> dict, YAML files the user names, JSON saved next to every result, and the hash
that ties a result to the settings that made it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from covidcxr.errors import InputError, MissingInputError

if TYPE_CHECKING:  # typeshed's protocol of dataclasses: stubs only, not importable at run time
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A settings dataclass as plain values (nested dataclasses included), ready for JSON or YAML."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, recursing into nested dataclasses; unknown keys are an error."""
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(hints)
    if unknown:
        raise InputError(f"unknown {cls.__name__} setting(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        default = hints[name].default_factory if hints[name].default_factory is not dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(default, value)
        elif isinstance(value, list) and isinstance(hints[name].default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file the user named (`what` it should hold, for the message); a missing or malformed
    file is one InputError line naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file (expected a YAML file of {what})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of {what}, found a {type(data).__name__}")
    return data


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def config_hash(obj: Any) -> str:
    """A short, stable digest of settings: a finished result is reused only when it was made with the same ones."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
