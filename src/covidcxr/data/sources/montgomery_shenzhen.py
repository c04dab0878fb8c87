"""NLM tuberculosis sets (Jaeger et al. 2014): Montgomery County (MCUCXR_0001_0.png) and Shenzhen
(CHNCXR_0001_0.png) in CXR_png/, with ClinicalReadings/<name>.txt beside it. Suffix _0 normal, _1 TB."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import abspath, age_group, frame, patient, sex, subdirs

NAME = "montgomery_shenzhen"
SOURCES = {"MCUCXR": "montgomery", "CHNCXR": "shenzhen"}
_FILE = re.compile(r"^(MCUCXR|CHNCXR)_(\d+)_([01])\.png$", re.IGNORECASE)
_SEX = re.compile(r"\b(female|male)\b|sex:\s*([MF])\b", re.IGNORECASE)
_AGE = re.compile(r"(?:age:\s*)?\b(\d+)\s*(y|yrs?|years?|months?|days?)\b", re.IGNORECASE)


def _image_dirs(root: Path) -> list[Path]:
    """root itself, root/CXR_png and <set>/CXR_png one level down (both sets unpacked side by side)."""
    candidates = [root, root / "CXR_png", *(d / "CXR_png" for d in subdirs(root))]
    return [d for d in candidates if d.is_dir()]


def _images(root: Path) -> list[Path]:
    return sorted(p for d in _image_dirs(root) for p in d.iterdir() if _FILE.match(p.name))


def detect(root: Path) -> bool:
    return any(any(_FILE.match(p.name) for p in d.iterdir()) for d in _image_dirs(root))


def parse_reading(text: str) -> tuple[str, str, str]:
    """(sex, age text, finding) from a ClinicalReadings file. Montgomery writes "Patient's Sex: F" /
    "Patient's Age: 040Y" lines, Shenzhen one line "male 35yrs"; the remaining lines are the finding."""
    sex_match = _SEX.search(text)
    age_match = _AGE.search(text)
    sex_text = (sex_match.group(1) or sex_match.group(2)) if sex_match else ""
    age_text = f"{age_match.group(1)} {age_match.group(2)}" if age_match else ""
    finding = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not re.search(r"sex:|age:|^(fe)?male\b", line.strip(), re.IGNORECASE)
    ]
    return sex_text, age_text, " ".join(finding)


def _reading(image: Path) -> tuple[str, str, str]:
    txt = image.parent.parent / "ClinicalReadings" / f"{image.stem}.txt"
    if not txt.is_file():
        return "", "", ""
    return parse_reading(txt.read_text(encoding="utf-8", errors="replace"))


def rows(root: Path) -> pd.DataFrame:
    records = []
    for path in _images(root):
        match = _FILE.match(path.name)
        assert match is not None  # _images lists only the names _FILE matches
        prefix, _, tb = match.groups()
        source = SOURCES[prefix.upper()]
        sex_text, age_text, finding = _reading(path)
        records.append(
            {
                "path": abspath(path),
                "label": "other" if tb == "1" else "normal",
                "source": source,
                # one image per patient in both sets, identified by the image number only
                "patient_id": patient(source, path.stem),
                "view": "PA",  # both sets are postero-anterior (Jaeger et al. 2014)
                # without a reading, the file name's suffix is the database's own label
                "finding": finding or ("tuberculosis" if tb == "1" else "normal"),
                "age_group": age_group(age_text),
                "sex": sex(sex_text),
            }
        )
    return frame(records)
