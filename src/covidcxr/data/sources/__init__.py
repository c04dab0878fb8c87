"""Database layout adapters: each turns one public database's folder into rows of the same table.

Every adapter module has NAME, detect(root) -> bool (cheap: file names and CSV headers only) and
rows(root) -> DataFrame with COLUMNS (path, label, source, patient_id, view, finding, age_group, sex, modality,
manufacturer, and where the row is listed and why it cannot be used). Nothing a row holds is fatal: a bad row is
returned with its `problem`, and rows whose image file is missing or a broken link are kept; ingest lists both with
their reasons.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pandas as pd

from covidcxr.data.sources import (
    actualmed,
    cohen,
    covidx,
    csv,
    figure1,
    folders,
    kermany,
    montgomery_shenzhen,
    nih,
    radiography,
    rsna,
)
from covidcxr.data.sources._common import (
    COLUMNS,
    IMAGE_SUFFIXES,
    LABELS,
    age_group,
    file_problem,
    image_files,
    sex,
    study_date,
)
from covidcxr.errors import InputError

__all__ = ["COLUMNS", "IMAGE_SUFFIXES", "LABELS", "LAYOUTS", "age_group", "detect_layout", "file_problem",
           "image_files", "load_source", "sex", "study_date"]

# Auto-detection tries these in order; the first match wins. covidx (split files beside image folders) comes first;
# csv precedes cohen/figure1/actualmed (all use
# metadata.csv; theirs has no path or label column), the specific layouts precede the generic
# folder-per-class one.
LAYOUTS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (covidx, csv, cohen, actualmed, figure1, rsna, nih, radiography, kermany, montgomery_shenzhen, folders)
}


def detect_layout(root: Path | str) -> str:
    """Name of the first layout whose detect() accepts root."""
    root = Path(root)
    for name, module in LAYOUTS.items():
        if module.detect(root):
            return name
    raise InputError(f"{root}: no known database layout found (known: {', '.join(LAYOUTS)})")


def load_source(root: Path | str, layout: str = "auto") -> tuple[pd.DataFrame, str]:
    """Rows of one database folder and the layout that read it."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r} for {root} (known: auto, {', '.join(LAYOUTS)})")
    elif not LAYOUTS[layout].detect(root):
        raise InputError(f"{root}: does not look like the {layout} layout (try --layout auto)")
    df = LAYOUTS[layout].rows(root)
    if df.empty:
        raise InputError(f"{root}: layout {layout} found no images")
    return df, layout
