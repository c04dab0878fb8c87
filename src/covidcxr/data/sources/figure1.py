"""agchung/Figure1-COVID-chestxray-dataset: metadata.csv + images/<patientid>.jpg|.png."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from covidcxr.data.sources import _agchung
from covidcxr.data.sources._common import image_files

NAME = "figure1"
_SAME_PATIENT_SUFFIX = re.compile(r"[a-z]$")  # COVID-00003a / COVID-00003b: two images of COVID-00003


def detect(root: Path) -> bool:
    return _agchung.has_metadata(root, image_column=None)


def rows(root: Path) -> pd.DataFrame:
    on_disk = {p.stem: p.name for p in image_files(root / "images")}

    def image_of(r: pd.Series) -> str:
        pid = r["patientid"].strip()
        return on_disk.get(pid, f"{pid}.jpg")  # not on disk: keep the row, ingest reports it missing

    return _agchung.read_rows(root, NAME, image_of, lambda pid: _SAME_PATIENT_SUFFIX.sub("", pid))
