"""Kermany et al. pediatric pneumonia set (Guangzhou; Kaggle 'chest-xray-pneumonia'):
chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/ with names like person1_bacteria_1.jpeg, IM-0115-0001.jpeg."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import abspath, frame, image_files, patient

NAME = "kermany"
SPLITS = ("train", "test", "val")
CLASSES = {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def _class_dirs(root: Path) -> list[Path]:
    """Class folders under root/ or root/chest_xray/ (the Kaggle archive's top folder)."""
    return [
        base / split / cls
        for base in (root, root / "chest_xray")
        for split in SPLITS
        for cls in CLASSES
        if (base / split / cls).is_dir()
    ]


def detect(root: Path) -> bool:
    return bool(_class_dirs(root))


def _patient_and_finding(stem: str, folder: str) -> tuple[str, str]:
    """personN groups a child's images; normals are grouped by their IM-XXXX study prefix.
    A name that follows neither pattern gets a per-image id (the database gives nothing better)."""
    if match := _PNEUMONIA.match(stem):
        return match.group(1), match.group(2).lower()
    if match := _NORMAL.match(stem):
        return match.group(1), folder.lower()
    return stem, folder.lower()


def rows(root: Path) -> pd.DataFrame:
    records = []
    for folder in _class_dirs(root):
        for path in image_files(folder):
            pid, finding = _patient_and_finding(path.stem, folder.name)
            records.append(
                {
                    "path": abspath(path),
                    "label": CLASSES[folder.name],
                    "source": NAME,
                    "patient_id": patient(NAME, pid),
                    "view": "AP",  # "anterior-posterior" (Kermany et al., Cell 2018)
                    "finding": finding,
                    "age_group": "pediatric",  # children aged 1-5 (Kermany et al., Cell 2018)
                    "sex": "",
                }
            )
    return frame(records)
