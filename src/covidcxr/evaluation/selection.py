"""Which images of a data folder an evaluation scores: the run's test part, or everything it did not learn from."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.cache import ImageCache
from covidcxr.errors import InputError


def select_images(run: Path, data: ImageCache, split: str) -> tuple[pd.DataFrame, int]:
    """Rows of `data` to score; returns (rows, images left out because the run trained or validated on them)."""
    df = data.manifest()
    runs_split = pd.read_csv(run / "split.csv")
    if split == "test":
        test_paths = set(runs_split.loc[runs_split["split"] == "test", "path"])
        rows = df[df["path"].isin(test_paths)]
        if rows.empty:
            raise InputError(f"{data.dir} holds none of the test images of {run}; use --split all for another data set")
        return rows.reset_index(drop=True), 0
    seen = set(runs_split.loc[runs_split["split"].isin(["train", "val"]), "path"])
    used = df["path"].isin(seen)
    return df[~used].reset_index(drop=True), int(used.sum())
