"""Checkpoints and run folders: what training writes and every later stage reads back.

A checkpoint holds plain values only (`{"model": state_dict, "meta": {...}}`), so it loads with
`torch.load(weights_only=True)` and never runs code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidcxr.errors import InputError, MissingInputError
from covidcxr.model.network import GrayClassifier, build_model, unwrap
from covidcxr.model.weights import is_checkpoint, load_file, short_error

LUNG_MODEL = "lungs.pt"  # a run's copy of the lung model its crop="lungs" preprocessing uses


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: dict[str, Any], extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write {"model": state_dict, "meta": meta, **extra} atomically (temp file + rename).

    `meta` gains the model's `arch` and `num_sources`, which `load_run` needs to rebuild it. `state_dict` replaces the
    model's current weights (e.g. the best epoch's, kept in memory by the training loop).
    """
    m = unwrap(model)
    if meta.get("arch", m.arch) != m.arch:
        raise ValueError(f"meta says arch {meta['arch']!r} but the model is {m.arch!r}")
    clash = {"model", "meta"} & set(extra or {})
    if clash:
        raise ValueError(f"extra checkpoint entries may not be named {', '.join(sorted(clash))}")
    payload = {"model": state_dict if state_dict is not None else m.state_dict(),
               "meta": {**meta, "arch": m.arch, "num_sources": m.num_sources}, **(extra or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, tensors on the CPU."""
    obj = load_file(path)
    if not is_checkpoint(obj):
        raise InputError(f"{path}: not a covidcxr checkpoint (no 'model' and 'meta' entries)")
    return obj


def load_run(
    run_dir: str | Path, which: str = "model.pt", device: str | torch.device = "cpu"
) -> tuple[GrayClassifier, dict[str, Any]]:
    """The model saved in a run folder, in eval mode on `device`, and its meta."""
    path = Path(run_dir) / which
    if not path.is_file():
        raise MissingInputError(f"{run_dir}: not a covidcxr run folder (no {which}); covidcxr train writes one")
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    try:
        with torch.device("meta"):  # no random initialisation of weights the checkpoint replaces (~0.3 s a load)
            model = build_model(meta["arch"], len(meta["classes"]), "none", int(meta.get("num_sources", 0)))
        model.load_state_dict(ckpt["model"], assign=True)
        model.float()  # assign keeps the stored dtype; weights stored in bf16 (guard members) are scored in float32
    except (KeyError, RuntimeError) as e:
        raise InputError(f"{path}: checkpoint does not match its meta ({short_error(e)})") from None
    if meta.get("augment", {}).get("crop") == "lungs":  # score with the run's copy of its lung model
        meta["augment"]["lung_model"] = str(Path(run_dir) / LUNG_MODEL)
    return model.to(device).eval(), meta
