"""The images a run trains and validates on: the task's rows of the data folder with their split, decided once at
the start from the settings and the seed alone (so a resumed run and every DDP rank see the same split).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidcxr.config import TrainConfig
from covidcxr.data import tasks
from covidcxr.data.cache import ImageCache
from covidcxr.data.splits import leave_sources_out, patient_split, published_split
from covidcxr.errors import InputError

RUN_COLUMNS = ("path", "label", "source", "patient_id", "sha1", "cache_index")  # what a run reads of the manifest


def make_split(df: pd.DataFrame, cfg: TrainConfig) -> pd.Series:
    """Patient-level split; held-out sources as the test part (external validation) beside the run's own test part;
    or a published split."""
    if cfg.split_files:
        val_frac = cfg.split_fractions[1] / (cfg.split_fractions[0] + cfg.split_fractions[1])
        return published_split(df, cfg.split_files, val_frac, cfg.seed)
    if cfg.holdout_sources:
        return leave_sources_out(df, cfg.holdout_sources, cfg.split_fractions, cfg.seed)
    return patient_split(df, cfg.split_fractions, cfg.seed)


def load_data(cfg: TrainConfig) -> tuple[ImageCache, pd.DataFrame]:
    """The task's images with their split; training rows optionally subsampled (seeded) for quick grids."""
    cache = ImageCache(cfg.data)
    df = cache.manifest(columns=RUN_COLUMNS)
    df["y"] = tasks.encode(df["label"], cfg.task)
    df = df[df["y"] >= 0].reset_index(drop=True)
    df["split"] = make_split(df, cfg)
    if cfg.max_train_images and (df["split"] == "train").sum() > cfg.max_train_images:
        train = df.index[df["split"] == "train"]
        drop = np.random.default_rng(cfg.seed).permutation(train)[cfg.max_train_images:]
        df.loc[drop, "split"] = "unused"
    for part in ("train", "val"):
        if df.loc[df["split"] == part, "y"].nunique() < 2:
            raise InputError(f"{cfg.data}: the {part} part of the split has fewer than two classes for task {cfg.task}")
    return cache, df
