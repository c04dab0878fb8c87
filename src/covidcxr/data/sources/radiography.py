"""COVID-19 Radiography Database (Qatar University / Kaggle): one folder per class.

v3+: COVID/, Normal/, Viral Pneumonia/, Lung_Opacity/, each with images/ and masks/ (plus *.metadata.xlsx,
not needed: the folder decides the label). v1-v2: flat COVID-19/ (or COVID/), NORMAL/, Viral Pneumonia/.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import abspath, frame, image_files, patient, subdirs

NAME = "radiography"
CLASSES = {  # folder name (any case) -> label
    "covid": "covid",
    "covid-19": "covid",
    "normal": "normal",
    "viral pneumonia": "pneumonia",
    "lung_opacity": "other",
}


def _class_dirs(root: Path) -> dict[Path, str]:
    return {d: CLASSES[d.name.lower()] for d in subdirs(root) if d.name.lower() in CLASSES}


def detect(root: Path) -> bool:
    names = {d.name.lower() for d in _class_dirs(root)}
    return "viral pneumonia" in names and bool(names & {"covid", "covid-19"})


def rows(root: Path) -> pd.DataFrame:
    records = []
    for folder, label in _class_dirs(root).items():
        images = folder / "images" if (folder / "images").is_dir() else folder  # skip masks/
        records += [
            {
                "path": abspath(path),
                # the database renamed every file (COVID-1.png ...): no patient id survives, so one per image
                "patient_id": patient(NAME, path.stem),
                "label": label,
                "source": NAME,
                "view": "unknown",
                "finding": folder.name,
                "age_group": "unknown",
                "sex": "",
            }
            for path in image_files(images)
        ]
    return frame(records)
