"""Generic CSV layout (DESIGN.md, "Files"): path (relative to the CSV) and label required; patient_id, source, view,
age_group, sex, finding, modality (CR, DX), manufacturer and date used when present. ROOT is the folder holding
metadata.csv, or a CSV.
A row with an empty path or a value not allowed is returned with its line and the reason, never raised: ingest
lists every such row and ingests the rest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import (
    LABELS,
    abspath,
    frame,
    patient,
    read_csv,
    read_header,
    require_columns,
    sex,
    study_date,
    view,
)
from covidcxr.errors import InputError

NAME = "csv"
REQUIRED = ("path", "label")
AGE_GROUPS = ("adult", "pediatric", "unknown")


def csv_file(root: Path) -> Path:
    return root if root.suffix.lower() == ".csv" else root / "metadata.csv"


def detect(root: Path) -> bool:
    """Either required column is enough: a CSV that lacks the other is then reported precisely."""
    return bool(set(REQUIRED) & set(read_header(csv_file(root))))


def _not_allowed(values: pd.Series, column: str, allowed: tuple[str, ...]) -> pd.Series:
    """Per row: why its value is not allowed, or ''."""
    reason = values.map(lambda v: f"{column} {v!r} is not one of {', '.join(allowed)}")
    return reason.where(~values.isin(allowed), "")


def _optional(df: pd.DataFrame, name: str) -> pd.Series:
    """An optional column, stripped, or empty strings when the CSV lacks it."""
    return df[name].str.strip() if name in df else pd.Series("", index=df.index, dtype=str)


def _problems(df: pd.DataFrame) -> pd.Series:
    """Per row: why it cannot be ingested ('' when it can); the first of several reasons is enough to fix."""
    empty = df["path"].str.strip().eq("").map({True: "empty path", False: ""})
    checks = pd.concat([empty, _not_allowed(df["label"], "label", LABELS),
                        _not_allowed(df["age_group"], "age_group", AGE_GROUPS)], axis=1)
    return checks.mask(checks == "").bfill(axis=1).iloc[:, 0].fillna("")


def rows(root: Path) -> pd.DataFrame:
    """Every CSV row, each with its line; rows that cannot be used carry the reason in `problem` (none is fatal)."""
    path = csv_file(root)
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    df = read_csv(path, numbered=True)
    require_columns(df, path, REQUIRED)
    df["label"] = df["label"].str.strip().str.lower()
    df["age_group"] = _optional(df, "age_group").str.lower().replace("", "unknown")
    problems = _problems(df)
    sources = _optional(df, "source").where(lambda s: s != "", path.parent.resolve().name)
    # no patient id: the path stands in, one id per image (the CSV says nothing about patients)
    patients = _optional(df, "patient_id").where(lambda s: s != "", df["path"])
    records = [
        {
            "path": abspath(path.parent / rel) if rel.strip() else "",
            "label": lab,
            "source": src,
            "patient_id": patient(src, pid),
            "view": view(v),
            "finding": fnd,
            "age_group": age,
            "sex": sex(sx),
            "modality": mod.upper(),
            "manufacturer": maker,
            "date": study_date(day),
            "listed_in": str(path),
            "line": str(line),
            "problem": problem,
        }
        for rel, lab, src, pid, v, fnd, age, sx, mod, maker, day, line, problem in zip(
            df["path"],
            df["label"],
            sources,
            patients,
            _optional(df, "view"),
            _optional(df, "finding"),
            df["age_group"],
            _optional(df, "sex"),
            _optional(df, "modality"),
            _optional(df, "manufacturer"),
            _optional(df, "date"),
            df.index,
            problems,
        )
    ]
    return frame(records)
