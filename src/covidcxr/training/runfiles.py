"""What a training run leaves in its folder: config.json, split.csv, history.csv (and TensorBoard's event files when
tensorboard is installed), model.pt with val_predictions.csv, and last.pt; and the checks before a run resumes.

The loop decides what to keep and when; this module is how it is written, so the files every later stage reads back
(ARCHITECTURE.md, "Run folder") are written in one place.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidcxr.config import TrainConfig, config_hash, save_json, to_dict
from covidcxr.errors import InputError, MissingInputError
from covidcxr.model.checkpoint import LUNG_MODEL, load_checkpoint, save_checkpoint

HISTORY_FIELDS = ["epoch", "train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds"]
SPLIT_COLUMNS = ["path", "source", "patient_id", "label", "split"]
VAL_COLUMNS = ["path", "source", "patient_id", "label", "score"]


def write_run_files(out: Path, cfg: TrainConfig, df: pd.DataFrame, resolved: dict[str, Any]) -> None:
    """A new run's config.json (its settings, then `resolved`: what "auto" became, the data's identity), split.csv and
    history.csv's header; a copy of the lung model when the run crops to the lungs, since it scores nothing without."""
    if cfg.augment.crop == "lungs":
        shutil.copyfile(cfg.augment.lung_model, out / LUNG_MODEL)
    save_json({**to_dict(cfg), **resolved}, out / "config.json")
    df[SPLIT_COLUMNS].to_csv(out / "split.csv", index=False)
    with open(out / "history.csv", "w", newline="") as fh:
        csv.writer(fh).writerow(HISTORY_FIELDS)


def resume_checkpoint(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """last.pt of the run in `out`, refused (one line) when there is none yet or `cfg` differs from the run's settings:
    a resumed run with other settings would be neither run."""
    path = out / "last.pt"
    if not path.exists():
        raise MissingInputError(f"{path}: nothing to resume (no checkpoint yet); run without --resume")
    saved = json.loads((out / "config.json").read_text())
    if saved.get("config_hash") != config_hash(cfg):
        raise InputError(f"{out}: settings differ from the run being resumed; use the same options or a new --out")
    return load_checkpoint(path)


def cut_history(out: Path, last_epoch: int) -> None:
    """history.csv back to the epochs last.pt holds, so a resumed run appends after them without repeating any."""
    header, *rows = (out / "history.csv").read_text().splitlines()
    kept = [row for row in rows if int(row.split(",", 1)[0]) <= last_epoch]  # rows as written: their digits unchanged
    (out / "history.csv").write_text("\n".join([header, *kept]) + "\n")


def tensorboard_writer(log_dir: Path) -> Any:
    """A TensorBoard writer when tensorboard is installed (optional); history.csv is written either way."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def record_epoch(out: Path, tensorboard: Any, epoch: int, figures: dict[str, float]) -> None:
    """One row of history.csv (and TensorBoard's scalars, when it has a writer) from `figures`, keyed like
    HISTORY_FIELDS after "epoch"."""
    f = figures
    with open(out / "history.csv", "a", newline="") as fh:
        csv.writer(fh).writerow([epoch, f"{f['train_loss']:.5f}", f"{f['val_loss']:.5f}", f"{f['val_auc']:.5f}",
                                 f"{f['lr']:.6g}", f"{f['images_per_s']:.1f}", f"{f['seconds']:.1f}"])
    if tensorboard:
        for key, value in {"loss/train": f["train_loss"], "loss/val": f["val_loss"], "auc/val": f["val_auc"],
                           "lr": f["lr"], "images_per_s": f["images_per_s"]}.items():
            tensorboard.add_scalar(key, value, epoch)
        tensorboard.flush()


def save_best(out: Path, model: torch.nn.Module, state: dict[str, torch.Tensor], meta: dict[str, Any],
              val_df: pd.DataFrame, score: np.ndarray) -> None:
    """model.pt (the best weights, with their threshold) and val_predictions.csv, the validation scores the shift
    alarm takes as its reference."""
    save_checkpoint(out / "model.pt", model, meta, state_dict=state)
    val_df.assign(score=score)[VAL_COLUMNS].to_csv(out / "val_predictions.csv", index=False)


def save_last(out: Path, model: torch.nn.Module, meta: dict[str, Any], progress: dict[str, Any],
              training_state: dict[str, Any] | None) -> None:
    """last.pt: the current weights with `training_state` (optimizer, schedule) that a resume needs; with None (a
    finished run, which nothing can resume) only `progress`, the record of where it ended, without weights."""
    save_checkpoint(out / "last.pt", model, meta, {**(training_state or {}), **progress},
                    state_dict=None if training_state is not None else {})
