"""Helpers every layout adapter shares: the row contract and the small normalisations of its fields."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pandas as pd

from covidcxr.errors import InputError

COLUMNS = ("path", "label", "source", "patient_id", "view", "finding", "age_group", "sex")
LABELS = ("covid", "normal", "pneumonia", "other")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})

_NOT_FRONTAL = frozenset({"l", "ll", "rl", "lateral", "axial", "coronal", "sagittal"})
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
_AGE_YEARS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*\+?\s*(?:y|yr|yrs|year|years)?\s*$", re.IGNORECASE)
_AGE_UNDER_ONE = re.compile(r"^\s*\d+\s*(?:d|w|m|days?|weeks?|months?)\s*$", re.IGNORECASE)


def frame(records: list[dict[str, str]]) -> pd.DataFrame:
    """The adapters' output table: exactly COLUMNS, all strings, in that order."""
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return df.fillna("").astype(str)


def abspath(path: Path | str) -> str:
    """Absolute, normalised path string (no symlink resolution: the file may be missing)."""
    return os.path.normpath(os.path.abspath(path))


def patient(source: str, raw: object) -> str:
    """Prefix a database's patient id with its source so ids never collide across databases."""
    text = str(raw).strip()
    return text if text.startswith(f"{source}:") else f"{source}:{text}"


def sex(raw: object) -> str:
    """M, F or '' from the many spellings databases use."""
    return _SEX.get(str(raw).strip().lower(), "")


def age_group(raw: object) -> str:
    """adult (>= 18 y), pediatric (< 18 y) or unknown, from ages like 45, '058Y', '50+', '9 months'."""
    text = str(raw).strip()
    if _AGE_UNDER_ONE.match(text):
        return "pediatric"
    match = _AGE_YEARS.match(text)
    if not match:
        return "unknown"
    return "adult" if float(match.group(1)) >= 18 else "pediatric"


def view(raw: object) -> str:
    """The database's view text, or 'unknown' when it gives none."""
    return str(raw).strip() or "unknown"


def is_frontal(raw: object) -> bool:
    """False for lateral and CT-plane views; an unstated view counts as frontal (chest X-ray databases
    state laterals explicitly)."""
    return str(raw).strip().lower() not in _NOT_FRONTAL


def read_header(csv_path: Path) -> list[str]:
    """Column names of a CSV without reading its body (detection must stay cheap)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            return [name.strip() for name in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def read_csv(csv_path: Path) -> pd.DataFrame:
    """Read a database CSV as strings, keeping empty cells as '' (no NaN guessing)."""
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def require_columns(df: pd.DataFrame, csv_path: Path, columns: tuple[str, ...] | list[str]) -> None:
    """One clear error naming the file and the first missing column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{csv_path}: missing required column {missing[0]!r}")


def image_files(folder: Path) -> list[Path]:
    """Image files below a folder, recursively, in a stable order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def subdirs(folder: Path) -> list[Path]:
    """Immediate sub-folders, sorted, hidden ones left out."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
