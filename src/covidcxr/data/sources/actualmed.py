"""agchung/Actualmed-COVID-chestxray-dataset: metadata.csv (imagename column) + images/."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.sources import _agchung

NAME = "actualmed"


def detect(root: Path) -> bool:
    return _agchung.has_metadata(root, image_column="imagename")


def rows(root: Path) -> pd.DataFrame:
    return _agchung.read_rows(root, NAME, lambda r: r["imagename"].strip(), lambda pid: pid)
