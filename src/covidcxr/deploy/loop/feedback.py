"""Readers' verdicts in from a CSV (reports arrive later than answers), and the images that carry one out as a data
set that `evaluate`, `validate` and `calibrate` accept: the loop from a prediction log back to a site's data."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from covidcxr.config import IngestConfig
from covidcxr.config.monitor import check_date
from covidcxr.data.ingest import IngestReport, ingest
from covidcxr.deploy.loop.monitor import read_log
from covidcxr.deploy.serve.log import PredictionLog, check_label
from covidcxr.errors import InputError

log = logging.getLogger(__name__)

KEYS = {"prediction_id": "id", "sha256": "sha256", "sop_instance_uid": "sop_uid"}  # CSV column -> log column
ALIASES = {"sop_uid": "sop_instance_uid", "sopinstanceuid": "sop_instance_uid", "id": "prediction_id"}
SOURCE = "site"  # the source name of exported images (patient ids become site:<id>)
IMAGES = "images"  # the folder inside the exported data set that holds the images and their metadata.csv


@dataclass
class ImportReport:
    recorded: int = 0  # verdicts recorded (one row may match several predictions of the same image)
    unchanged: int = 0  # rows whose verdict was already the latest one (an import run twice)
    problems: list[str] = field(default_factory=list)  # one line per row that could not be used


def _read_verdicts(path: Path) -> tuple[pd.DataFrame, str]:
    """The CSV, its columns normalised, and which key column it matches predictions by."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [ALIASES.get(c.strip().lower(), c.strip().lower()) for c in frame.columns]
    key = next((k for k in KEYS if k in frame.columns), None)
    if key is None or "label" not in frame.columns:
        raise InputError(f"{path}: needs a label column and one of {', '.join(KEYS)} (found "
                         f"{', '.join(frame.columns) or 'no columns'})")
    return frame, key


def import_verdicts(db: str | Path, csv_path: str | Path, reader: str | None = None) -> ImportReport:
    """Record each CSV row's verdict on the predictions it names (by prediction_id, the image's SHA-256 or its SOP
    Instance UID; every prediction of that image); `reader` fills rows without one. Rows that name no prediction or
    carry a label that is not a data set label are listed, the rest recorded."""
    path = Path(csv_path)
    frame, key = _read_verdicts(path)
    if not Path(db).is_file():
        raise InputError(f"{db}: no such prediction log")
    report, plog = ImportReport(), PredictionLog(db)
    try:
        for line, row in zip(range(2, len(frame) + 2), frame.to_dict("records")):
            label, value = row["label"].strip().lower(), row[key].strip()
            who, comment = row.get("reader", "").strip() or reader, row.get("comment", "").strip() or None
            try:
                check_label(label)
            except InputError as exc:
                report.problems.append(f"{path} line {line}: {exc}")
                continue
            ids = plog.find(KEYS[key], value) if value else []
            if not ids:
                report.problems.append(f"{path} line {line}: no prediction in the log with {key} {value or '(empty)'}")
            for prediction_id in ids:
                latest = (plog.verdicts(prediction_id) or [{}])[-1]
                if (latest.get("label"), latest.get("reader"), latest.get("comment")) == (label, who, comment):
                    report.unchanged += 1
                else:
                    plog.add_verdict(prediction_id, label, who, comment, origin=f"import {path.name}")
                    report.recorded += 1
    finally:
        plog.close()
    return report


@dataclass
class ExportReport:
    images: int = 0  # images written to the data set
    ingest: IngestReport | None = None
    problems: list[str] = field(default_factory=list)  # verdicts whose image was not kept (or is gone)


def export_site(db: str | Path, out: str | Path, since: str | None = None) -> ExportReport:
    """An ingested data folder (OUT, as `covidcxr ingest` writes it) of the kept images that carry a verdict, each
    labelled with its latest verdict, with its patient id where the DICOM or the request gave one, else its hash.
    The images and their metadata.csv stay in OUT/images, so the folder can be ingested again or moved whole."""
    frame, _ = read_log(db, since=check_date(since), judged_only=True)
    frame = frame[frame["status"] == "scored"].drop_duplicates("sha256", keep="last")  # an image's latest verdict
    report, rows = ExportReport(), []
    images = Path(out) / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    for r in frame.to_dict("records"):
        kept = Path(r["image_path"]) if r["image_path"] else None
        if kept is None or not kept.is_file():
            why = "was not kept (serve or pacs without --keep-images)" if kept is None else f"is gone ({kept})"
            report.problems.append(f"prediction {r['id']} ({r['filename']}): its image {why}")
            continue
        name = f"{r['sha256']}{kept.suffix}"
        if not (images / name).is_file():
            shutil.copyfile(kept, images / name)
        rows.append({"path": name, "label": r["verdict"], "patient_id": r["patient_id"] or f"sha256-{r['sha256']}",
                     "source": SOURCE})
    if not rows:
        raise InputError(f"{db}: no kept image carries a verdict{f' since {since}' if since else ''} "
                         f"({len(report.problems)} verdict(s) without a kept image); serve or watch with "
                         "--keep-images DIR, then record verdicts")
    pd.DataFrame(rows).to_csv(images / "metadata.csv", index=False)
    report.images = len(rows)
    report.ingest = ingest([images], Path(out), IngestConfig())
    return report
