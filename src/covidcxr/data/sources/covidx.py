"""COVIDx (COVID-Net, lindawangg/COVID-Net): an images folder per part plus the official split files.

ROOT/train/, ROOT/test/ (ROOT/val/ from CXR-4 on) hold the images; ROOT/train.txt, test.txt, val.txt (CXR-4) or
train_COVIDx9A.txt, test_COVIDx9A.txt ... list them, one per line: `patient_id filename class source`. Classes are
normal / pneumonia / COVID-19 (COVIDx 1-8) or positive / negative (CXR-2 on); `negative` becomes label `other` (not
COVID-19, neither known normal nor pneumonia), which `--task covid-vs-rest` counts as negative. The source column
(cohen, rsna, ricord, bimcv, ...) becomes the row's source and prefixes its patient id. The part a file lists is
honoured by `train --split-file` and `evaluate --split-file`, not by ingest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import abspath, frame, patient
from covidcxr.data.splits import PARTS

NAME = "covidx"
CLASSES = {"covid-19": "covid", "positive": "covid", "normal": "normal", "pneumonia": "pneumonia",
           "negative": "other"}


def split_files(root: Path) -> list[Path]:
    """The split files in ROOT: text files named for a part whose first line has COVIDx's four columns."""
    found = []
    for path in sorted(root.glob("*.txt")):
        if not any(part in path.name.lower() for part in PARTS):
            continue
        with open(path, errors="replace") as fh:
            first = fh.readline().split()
        if len(first) >= 4 and first[2].lower() in CLASSES:
            found.append(path)
    return found


def detect(root: Path) -> bool:
    return root.is_dir() and bool(split_files(root))


def _image(root: Path, part: str, filename: str) -> Path:
    """Where a listed image lies: in its part's folder (COVIDx's layout), else in ROOT itself."""
    in_part = root / part / filename
    return in_part if in_part.exists() or not (root / filename).exists() else root / filename


def rows(root: Path) -> pd.DataFrame:
    records = []
    for listing in split_files(root):
        part = next(p for p in PARTS if p in listing.name.lower())
        for number, line in enumerate(listing.read_text(errors="replace").splitlines(), start=1):
            cells = line.split()
            if not cells:
                continue
            record = {"listed_in": str(listing), "line": str(number), "view": "unknown", "age_group": "unknown",
                      "sex": ""}
            if len(cells) < 4:
                records.append({**record, "label": "other", "source": NAME,
                                "patient_id": patient(NAME, f"{listing.name}:{number}"),
                                "problem": "expected `patient_id filename class source`"})
                continue
            pid, filename, cls, source = cells[:4]
            label = CLASSES.get(cls.lower())
            records.append({**record, "path": abspath(_image(root, part, filename)), "label": label or "other",
                            "source": source, "patient_id": patient(source, pid), "finding": cls,
                            "problem": "" if label else f"unknown class {cls!r}"})
    return frame(records)
