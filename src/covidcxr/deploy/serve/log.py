"""SQLite log of every prediction the service makes, so each answer can be traced to an image and a model."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_utc TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    filename TEXT NOT NULL,
    probability REAL NOT NULL,
    label TEXT NOT NULL,
    threshold REAL NOT NULL,
    model_id TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class LogRecord:
    """One prediction; `time_utc` is ISO 8601 with an explicit UTC offset."""

    time_utc: str
    sha256: str
    filename: str
    probability: float
    label: str
    threshold: float
    model_id: str


_COLUMNS = [f.name for f in fields(LogRecord)]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class PredictionLog:
    """Append-only prediction table; one short-lived connection per call, so any thread may use it.

    WAL mode lets readers (e.g. someone inspecting the file) work while the service writes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """Open, commit (or roll back on error) and always close."""
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def add(self, record: LogRecord) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self._connection() as conn:
            conn.execute(f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES ({placeholders})", astuple(record))

    def records(self) -> list[LogRecord]:
        with self._connection() as conn:
            rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM predictions ORDER BY id").fetchall()
        return [LogRecord(*row) for row in rows]
