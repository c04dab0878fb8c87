"""RSNA Pneumonia Detection Challenge: stage_2_train_images/*.dcm + stage_2_detailed_class_info.csv
(patientId, class) beside stage_2_train_labels.csv (boxes; several rows per image). Stage 1 works too."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from covidcxr.data.sources._common import abspath, age_group, frame, patient, read_csv, require_columns, sex, view
from covidcxr.errors import InputError

NAME = "rsna"
CLASSES = {"Normal": "normal", "Lung Opacity": "pneumonia", "No Lung Opacity / Not Normal": "other"}
_HEADER_TAGS = ["ViewPosition", "PatientSex", "PatientAge"]


def _stage_files(root: Path) -> tuple[Path, Path] | None:
    """(class info CSV, train image folder) of the latest stage present."""
    for stage in (2, 1):
        info = root / f"stage_{stage}_detailed_class_info.csv"
        images = root / f"stage_{stage}_train_images"
        if info.is_file() and images.is_dir():
            return info, images
    return None


def detect(root: Path) -> bool:
    return _stage_files(root) is not None


def _dicom_header(path: Path) -> dict[str, str]:
    """View, sex and age live only in the DICOM header (the CSVs have none); view matters because
    AP vs PA is confounded with the label in this database. A missing or broken file gives empty
    values here; ingest decodes every file and reports those as unreadable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (OSError, InvalidDicomError):
        return {}
    return {tag: str(ds.get(tag, "") or "") for tag in _HEADER_TAGS}


def rows(root: Path) -> pd.DataFrame:
    found = _stage_files(root)
    if found is None:
        raise InputError(f"{root}: no stage_2_detailed_class_info.csv with stage_2_train_images/ beside it")
    info_csv, images = found
    info = read_csv(info_csv)
    require_columns(info, info_csv, ("patientId", "class"))
    info = info.drop_duplicates("patientId")  # one row per box in the CSV, one image each
    unknown = sorted(set(info["class"]) - set(CLASSES))
    if unknown:
        raise InputError(f"{info_csv}: unknown class {unknown[0]!r} (expected one of {', '.join(CLASSES)})")
    records = []
    for pid, cls in zip(info["patientId"], info["class"]):
        path = images / f"{pid}.dcm"
        header = _dicom_header(path)
        records.append(
            {
                "path": abspath(path),
                "label": CLASSES[cls],
                "source": NAME,
                "patient_id": patient(NAME, pid),
                "view": view(header.get("ViewPosition", "")),
                "finding": cls,
                "age_group": age_group(header.get("PatientAge", "")),
                "sex": sex(header.get("PatientSex", "")),
            }
        )
    return frame(records)
