"""Shared reader for the two COVID-Net collections of agchung (Figure 1 and Actualmed): same metadata.csv
columns, different ways of naming the image file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import (
    abspath,
    age_group,
    frame,
    is_frontal,
    patient,
    read_csv,
    read_header,
    require_columns,
    sex,
    view,
)

_LABELS = {"covid-19": "covid", "no finding": "normal", "pneumonia": "pneumonia"}


def has_metadata(root: Path, image_column: str | None) -> bool:
    """metadata.csv with patientid + finding, and `image_column` (None: neither filename nor imagename)."""
    columns = set(read_header(root / "metadata.csv"))
    if not {"patientid", "finding"} <= columns or not (root / "images").is_dir():
        return False
    if image_column is None:
        return not columns & {"filename", "imagename"}
    return image_column in columns


def label(finding: str) -> str:
    return _LABELS.get(finding.strip().lower(), "other")


def read_rows(
    root: Path,
    source: str,
    image_of: Callable[[pd.Series], str],
    patient_of: Callable[[str], str],
) -> pd.DataFrame:
    """Rows with a stated finding, X-ray, not lateral. Rows without a finding are left out: these
    collections leave it empty for inconclusive cases, so they have no label at all."""
    csv_path = root / "metadata.csv"
    df = read_csv(csv_path)
    require_columns(df, csv_path, ("patientid", "finding", "view"))
    df = df[df["finding"].str.strip() != ""]
    if "modality" in df:
        df = df[df["modality"].str.strip().isin(["X-ray", ""])]
    df = df[df["view"].map(is_frontal)]
    records = [
        {
            "path": abspath(root / "images" / image_of(r)),
            "label": label(r["finding"]),
            "source": source,
            "patient_id": patient(source, patient_of(r["patientid"].strip())),
            "view": view(r["view"]),
            "finding": r["finding"].strip(),
            "age_group": age_group(r.get("age", "")),
            "sex": sex(r.get("sex", "")),
        }
        for _, r in df.iterrows()
    ]
    return frame(records)
