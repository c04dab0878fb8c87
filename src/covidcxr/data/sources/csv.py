"""Generic CSV layout (DESIGN.md, "Files"): path (relative to the CSV) and label required; patient_id,
source, view, age_group, sex, finding used when present. ROOT is the folder holding metadata.csv, or a CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidcxr.data.sources._common import LABELS, abspath, frame, patient, read_csv, read_header, require_columns, sex, view
from covidcxr.errors import InputError

NAME = "csv"
REQUIRED = ("path", "label")
AGE_GROUPS = ("adult", "pediatric", "unknown")


def csv_file(root: Path) -> Path:
    return root if root.suffix.lower() == ".csv" else root / "metadata.csv"


def detect(root: Path) -> bool:
    """Either required column is enough: a CSV that lacks the other is then reported precisely."""
    return bool(set(REQUIRED) & set(read_header(csv_file(root))))


def _check_values(df: pd.DataFrame, column: str, allowed: tuple[str, ...], csv_path: Path) -> None:
    """One error naming the CSV line (the header is line 1) of the first value not allowed."""
    bad = ~df[column].isin(allowed)
    if bad.any():
        row = int(bad.to_numpy().argmax())
        value, choices = df[column].iloc[row], ", ".join(allowed)
        raise InputError(f"{csv_path}: line {row + 2}: {column} {value!r} is not one of {choices}")


def _optional(df: pd.DataFrame, name: str) -> pd.Series:
    """An optional column, stripped, or empty strings when the CSV lacks it."""
    return df[name].str.strip() if name in df else pd.Series("", index=df.index, dtype=str)


def rows(root: Path) -> pd.DataFrame:
    path = csv_file(root)
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    df = read_csv(path)
    require_columns(df, path, REQUIRED)
    df["label"] = df["label"].str.strip().str.lower()
    _check_values(df, "label", LABELS, path)
    empty = df["path"].str.strip() == ""
    if empty.any():
        raise InputError(f"{path}: line {int(empty.to_numpy().argmax()) + 2}: empty path")
    sources = _optional(df, "source").where(lambda s: s != "", path.parent.resolve().name)
    df["age_group"] = _optional(df, "age_group").str.lower().replace("", "unknown")
    _check_values(df, "age_group", AGE_GROUPS, path)
    # no patient id: the path stands in, one id per image (the CSV says nothing about patients)
    patients = _optional(df, "patient_id").where(lambda s: s != "", df["path"])
    records = [
        {
            "path": abspath(path.parent / rel),
            "label": lab,
            "source": src,
            "patient_id": patient(src, pid),
            "view": view(v),
            "finding": fnd,
            "age_group": age,
            "sex": sex(sx),
        }
        for rel, lab, src, pid, v, fnd, age, sx in zip(
            df["path"],
            df["label"],
            sources,
            patients,
            _optional(df, "view"),
            _optional(df, "finding"),
            df["age_group"],
            _optional(df, "sex"),
        )
    ]
    return frame(records)
