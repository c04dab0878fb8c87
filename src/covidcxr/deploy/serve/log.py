"""SQLite log of every prediction the service (or a PACS watcher) makes, so each answer can be traced to an image and
a model, and of the readers' verdicts on them, so `monitor` can follow the model over time and `feedback export` can
turn the verdicts into a data set.

Tables: `predictions` (one row per image handled: `status` scored | refused | unreadable, with the `reason` of a
refusal; the DICOM UIDs and patient id where the image carried them; `image_path` where the image was kept),
`verdicts` (every verdict ever recorded, so re-recording keeps the history: the latest per prediction counts) and
`models` (each model that answered, with its threshold and validation scores: the shift alarm's reference). A log
written before these columns existed is brought up to date when it is opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from covidcxr.data.tasks import LABELS
from covidcxr.errors import InputError
from covidcxr.trust.shift import reference_scores, validation_disagreement

STATUSES = ("scored", "refused", "unreadable")

_PREDICTIONS = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_utc TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    filename TEXT NOT NULL,
    probability REAL,
    label TEXT,
    threshold REAL NOT NULL,
    model_id TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'scored',
    reason TEXT,
    patient_id TEXT,
    study_uid TEXT,
    series_uid TEXT,
    sop_uid TEXT,
    image_path TEXT,
    origin TEXT
)"""
_OTHERS = """
CREATE INDEX IF NOT EXISTS predictions_sha256 ON predictions (sha256);
CREATE INDEX IF NOT EXISTS predictions_sop_uid ON predictions (sop_uid);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prediction_id INTEGER NOT NULL REFERENCES predictions (id),
    time_utc TEXT NOT NULL,
    label TEXT NOT NULL,
    reader TEXT,
    comment TEXT,
    origin TEXT
);
CREATE INDEX IF NOT EXISTS verdicts_prediction ON verdicts (prediction_id);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    run TEXT,
    threshold REAL NOT NULL,
    positive_label TEXT NOT NULL,
    reference TEXT NOT NULL,
    expected_disagreement REAL,
    first_seen TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class LogRecord:
    """One image handled; `time_utc` is ISO 8601 with an explicit UTC offset. A refused or unreadable image has no
    probability and no label, and says why in `reason`."""

    time_utc: str
    sha256: str
    filename: str
    probability: float | None
    label: str | None
    threshold: float
    model_id: str
    status: str = "scored"
    reason: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    image_path: str | None = None
    origin: str | None = None  # serve | pacs


_COLUMNS = [f.name for f in fields(LogRecord)]
IDS = ("patient_id", "study_uid", "series_uid", "sop_uid")  # what a DICOM header or the request may give


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_label(label: str) -> str:
    """A verdict's label: one of the data set labels (what `ingest` accepts), so an exported verdict is a label."""
    if label not in LABELS:
        raise InputError(f"label {label!r}: a verdict is one of {', '.join(LABELS)}")
    return label


class PredictionLog:
    """The log on one connection, shared by the request threads under a lock.

    WAL mode lets readers (`monitor`, someone inspecting the file) work while the service writes; with WAL,
    synchronous=NORMAL keeps every committed row through a crash of the service and costs no fsync per prediction (a
    power cut may lose the last few rows, never corrupt the file). Opening a connection and an fsync per prediction
    cost about a tenth of the service's CPU under load (benchmarks/bench_serve.py).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._lock = threading.Lock()
        with self._transaction() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            _upgrade(conn)
            conn.execute(_PREDICTIONS)
            conn.executescript(_OTHERS)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, alone, inside a transaction: committed at the end, rolled back on error."""
        with self._lock, self._conn:
            yield self._conn

    def add(self, record: LogRecord, ids: Mapping[str, str | None] | None = None) -> int:
        """Log one image, with the IDS its DICOM header (or the request) gave where `ids` has them; its prediction
        id."""
        row = asdict(record) | {key: value for key, value in (ids or {}).items() if key in IDS}
        with self._transaction() as conn:
            cur = conn.execute(f"INSERT INTO predictions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                               tuple(row.values()))
        return int(cur.lastrowid or 0)

    def refuse(self, sha256: str, filename: str, status: str, reason: str, model_id: str, threshold: float,
               ids: Mapping[str, str | None] | None = None, origin: str | None = None) -> int:
        """Log an image that was not scored (`status` refused or unreadable) with the reason; its prediction id."""
        if status not in STATUSES[1:]:
            raise ValueError(f"a refusal's status is refused or unreadable, not {status!r}")
        return self.add(LogRecord(utc_now(), sha256, filename, None, None, threshold, model_id, status, reason,
                                  origin=origin), ids)

    def records(self) -> list[LogRecord]:
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM predictions ORDER BY id").fetchall()
        return [LogRecord(*row) for row in rows]

    def record_model(self, model_id: str, threshold: float, positive_label: str,
                     reference: Sequence[float] | np.ndarray, expected_disagreement: float | None = None,
                     run: str | Path | None = None) -> None:
        """Remember a model that answers here, once: its validation scores (the shift alarm's reference) and the share
        of validation images it gets wrong (the readers' disagreement to expect)."""
        with self._transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (model_id, None if run is None else str(run), threshold, positive_label,
                          json.dumps([round(float(s), 6) for s in reference]), expected_disagreement, utc_now()))

    def record_run(self, run_dir: str | Path, model_id: str, threshold: float,
                   positive_label: str) -> np.ndarray | None:
        """Record the model of a run folder with its validation scores (`record_model`); those scores, or None for
        a run without them (e.g. a random one)."""
        try:
            reference = reference_scores(run_dir)
        except InputError:
            reference = None
        self.record_model(model_id, threshold, positive_label, [] if reference is None else reference,
                          validation_disagreement(run_dir, threshold, positive_label), run_dir)
        return reference

    def add_verdict(self, prediction_id: int, label: str, reader: str | None = None, comment: str | None = None,
                    origin: str = "api") -> int:
        """Record a reader's verdict on a logged prediction (earlier ones stay, as history); the verdict's id."""
        check_label(label)
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM predictions WHERE id = ?", (prediction_id,)).fetchone() is None:
                raise KeyError(prediction_id)
            cur = conn.execute("INSERT INTO verdicts (prediction_id, time_utc, label, reader, comment, origin) "
                               "VALUES (?, ?, ?, ?, ?, ?)", (prediction_id, utc_now(), label, reader, comment, origin))
        return int(cur.lastrowid or 0)

    def verdicts(self, prediction_id: int) -> list[dict]:
        """Every verdict on one prediction, oldest first."""
        with self._transaction() as conn:
            rows = conn.execute("SELECT time_utc, label, reader, comment, origin FROM verdicts WHERE prediction_id = ? "
                                "ORDER BY id", (prediction_id,)).fetchall()
        return [dict(zip(("time_utc", "label", "reader", "comment", "origin"), row)) for row in rows]

    def find(self, column: str, value: str) -> list[int]:
        """The ids of the predictions whose `column` (id, sha256 or sop_uid) is `value`."""
        if column not in ("id", "sha256", "sop_uid"):
            raise ValueError(f"predictions are found by id, sha256 or sop_uid, not {column}")
        with self._transaction() as conn:
            return [row[0] for row in conn.execute(f"SELECT id FROM predictions WHERE {column} = ?", (value,))]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a log written before status, reason, UIDs and kept images were logged up to date (its rows keep their
    ids, so nothing that refers to them breaks); a new or current log is left alone."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(predictions)")}
    if not columns or "status" in columns:
        return
    old = ", ".join(("id", *(c for c in _COLUMNS if c in columns)))
    conn.execute("ALTER TABLE predictions RENAME TO predictions_before_upgrade")
    conn.execute(_PREDICTIONS)
    conn.execute(f"INSERT INTO predictions ({old}) SELECT {old} FROM predictions_before_upgrade")
    conn.execute("DROP TABLE predictions_before_upgrade")
