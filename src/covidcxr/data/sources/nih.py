"""NIH ChestX-ray14: Data_Entry_2017[_v2020].csv + PNGs in images/ or images_001/images/ ... images_012/."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import abspath, age_group, frame, patient, read_csv, require_columns, sex, view
from covidcxr.errors import InputError

NAME = "nih"
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # v2020 first: it fixed ages


def _entry_csv(root: Path) -> Path | None:
    return next((root / name for name in CSV_NAMES if (root / name).is_file()), None)


def detect(root: Path) -> bool:
    return _entry_csv(root) is not None


def _image_index(root: Path) -> dict[str, Path]:
    """File name -> path over every image folder the releases use (scandir: 112,120 files)."""
    folders = [root / "images", *sorted(root.glob("images_*")), *sorted(root.glob("images_*/images"))]
    index: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as entries:
                index.update((e.name, Path(e.path)) for e in entries if e.is_file())
    return index


def label(finding_labels: str) -> str:
    labels = finding_labels.split("|")
    if labels == ["No Finding"]:
        return "normal"
    return "pneumonia" if "Pneumonia" in labels else "other"


def rows(root: Path) -> pd.DataFrame:
    csv_path = _entry_csv(root)
    if csv_path is None:
        raise InputError(f"{root}: no {' or '.join(CSV_NAMES)}")
    df = read_csv(csv_path)
    require_columns(df, csv_path, COLUMNS)
    index = _image_index(root)
    records = [
        {
            "path": abspath(index.get(r["Image Index"], root / "images" / r["Image Index"])),
            "label": label(r["Finding Labels"]),
            "source": NAME,
            "patient_id": patient(NAME, r["Patient ID"]),
            "view": view(r["View Position"]),
            "finding": r["Finding Labels"],
            "age_group": age_group(r["Patient Age"]),
            "sex": sex(r["Patient Gender"]),
        }
        for r in df.to_dict("records")
    ]
    return frame(records)
