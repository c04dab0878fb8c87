"""Generic folder-per-class layout: ROOT/<class name>/**/image files. Lowest detection priority."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import IMAGE_SUFFIXES, abspath, frame, image_files, patient, subdirs

NAME = "folders"
_NAMES = {
    "covid": "covid", "covid 19": "covid", "covid19": "covid", "covid positive": "covid",
    "normal": "normal", "healthy": "normal", "no finding": "normal", "negative": "normal",
    "pneumonia": "pneumonia", "viral pneumonia": "pneumonia", "bacterial pneumonia": "pneumonia",
    "bacterial": "pneumonia", "viral": "pneumonia", "non covid pneumonia": "pneumonia",
}


def label(folder_name: str) -> str:
    """Folder name -> label, ignoring case and -/_/space differences; unknown names are 'other'."""
    key = re.sub(r"[\s_-]+", " ", folder_name.strip().lower())
    return _NAMES.get(key, "other")


def _has_image(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))


def detect(root: Path) -> bool:
    return any(label(d.name) != "other" and _has_image(d) for d in subdirs(root))


def rows(root: Path) -> pd.DataFrame:
    source = root.resolve().name
    records = [
        {
            "path": abspath(path),
            "label": label(folder.name),
            "source": source,
            # a bare folder of images says nothing about patients: one id per image (its relative path)
            "patient_id": patient(source, path.relative_to(root).with_suffix("").as_posix()),
            "view": "unknown",
            "finding": folder.name,
            "age_group": "unknown",
            "sex": "",
        }
        for folder in subdirs(root)
        for path in image_files(folder)
    ]
    return frame(records)
