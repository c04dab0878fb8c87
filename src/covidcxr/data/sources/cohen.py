"""ieee8023/covid-chestxray-dataset (Cohen et al.): metadata.csv + images/, frontal X-rays only."""

from __future__ import annotations

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

NAME = "cohen"


def detect(root: Path) -> bool:
    columns = {c.lower() for c in read_header(root / "metadata.csv")}
    return {"patientid", "finding", "filename"} <= columns


def label(finding: str) -> str:
    """Findings are paths like 'Pneumonia/Viral/COVID-19' (older releases: plain 'COVID-19')."""
    text = finding.strip().lower()
    if "covid-19" in text:
        return "covid"
    if text == "no finding":
        return "normal"
    if text.startswith("pneumonia"):
        return "pneumonia"
    return "other"


def rows(root: Path) -> pd.DataFrame:
    csv_path = root / "metadata.csv"
    df = read_csv(csv_path).rename(columns=str.lower)
    require_columns(df, csv_path, ("patientid", "finding", "filename", "view", "sex", "age"))
    if "modality" in df:  # releases before April 2020 had no modality column and only X-rays
        df = df[df["modality"].str.strip() == "X-ray"]
    df = df[df["view"].map(is_frontal)]
    folders = df["folder"] if "folder" in df else pd.Series("images", index=df.index)
    records = [
        {
            "path": abspath(root / (folder.strip() or "images") / r.filename.strip()),
            "label": label(r.finding),
            "source": NAME,
            "patient_id": patient(NAME, r.patientid),
            "view": view(r.view),
            "finding": r.finding.strip(),
            "age_group": age_group(r.age),
            "sex": sex(r.sex),
        }
        for folder, r in zip(folders, df.itertuples(index=False))
    ]
    return frame(records)
