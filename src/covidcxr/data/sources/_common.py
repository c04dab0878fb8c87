"""Helpers every layout adapter shares: the row contract and the small normalisations of its fields."""

from __future__ import annotations

import csv
import os
import re
import stat
from pathlib import Path

import pandas as pd

from covidcxr.errors import InputError

# The row contract; the last three say where a row is listed (a CSV and its line; '' for files found in folders)
# and why it cannot be used ('' when it can), so ingest lists every bad row instead of stopping at the first.
COLUMNS = ("path", "label", "source", "patient_id", "view", "finding", "age_group", "sex", "modality", "manufacturer",
           "date", "listed_in", "line", "problem")
LABELS = ("covid", "normal", "pneumonia", "other")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})

_NOT_FRONTAL = frozenset({"l", "ll", "rl", "lateral", "axial", "coronal", "sagittal"})
_SEX = {"m": "M", "male": "M", "f": "F", "female": "F"}
_AGE_YEARS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*\+?\s*(?:y|yr|yrs|year|years)?\s*$", re.IGNORECASE)
_AGE_UNDER_ONE = re.compile(r"^\s*\d+\s*(?:d|w|m|days?|weeks?|months?)\s*$", re.IGNORECASE)


def frame(records: list[dict[str, str]]) -> pd.DataFrame:
    """The adapters' output table: exactly COLUMNS, all strings, in that order."""
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS)).astype(object)
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


def study_date(raw: object) -> str:
    """YYYY-MM-DD from the usual spellings (DICOM's YYYYMMDD, ISO dates, ISO timestamps), '' when not a date."""
    parsed = pd.to_datetime(str(raw).strip(), errors="coerce", format="mixed")
    return "" if pd.isna(parsed) else parsed.strftime("%Y-%m-%d")


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


def read_csv(csv_path: Path, numbered: bool = False) -> pd.DataFrame:
    """Read a database CSV as strings, keeping empty cells as '' (no NaN guessing).

    numbered: the index is each row's line in the file (the header is line 1; blank lines are skipped but counted),
    so a problem can be reported where the user will find it."""
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skip_blank_lines=not numbered)
    df.columns = [str(c).strip() for c in df.columns]
    if numbered:
        df.index = df.index + 2
        df = df[(df != "").any(axis=1)]
    return df


def require_columns(df: pd.DataFrame, csv_path: Path, columns: tuple[str, ...] | list[str]) -> None:
    """One clear error naming the file and the first missing column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{csv_path}: missing required column {missing[0]!r}")


def image_files(folder: Path) -> list[Path]:
    """Image files below a folder, recursively, in a stable order, plus what cannot be looked at: broken symbolic
    links with an image suffix and folders that cannot be read. Those are kept so that `file_problem` names them
    for the user (ingest and predict list each with its reason) instead of their images going missing silently."""
    unreadable: list[Path] = []

    def note(exc: OSError) -> None:  # a folder that is not there holds no images; one that cannot be read is listed
        if not isinstance(exc, FileNotFoundError):
            unreadable.append(Path(exc.filename))

    found = [
        Path(top, name)
        for top, _, names in os.walk(folder, onerror=note)
        for name in names
        if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")
    ]
    return sorted(found + unreadable)


def file_problem(path: Path | str) -> str:
    """Why a listed path is not a regular file that can be opened ('' when it is one), in one short phrase."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
        return "file not found"
    except OSError as exc:
        return f"cannot access ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        try:
            os.scandir(path).close()
        except OSError as exc:
            return f"folder cannot be read ({exc.strerror or exc})"
        return "a folder, not an image file"
    return "" if stat.S_ISREG(mode) else "not a regular file"


def subdirs(folder: Path) -> list[Path]:
    """Immediate sub-folders, sorted, hidden ones left out."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
