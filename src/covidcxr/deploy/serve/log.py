"""SQLite log of every prediction the service makes, so each answer can be traced to an image and a model."""

from __future__ import annotations

import sqlite3
import threading
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
    """Append-only prediction table on one connection, shared by the request threads under a lock.

    WAL mode lets readers (e.g. someone inspecting the file) work while the service writes; with WAL, synchronous=
    NORMAL keeps every committed row through a crash of the service and costs no fsync per prediction (a power cut
    may lose the last few rows, never corrupt the file). Opening a connection and an fsync per prediction cost
    about a tenth of the service's CPU under load (benchmarks/bench_serve.py).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._lock = threading.Lock()
        with self._transaction() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, alone, inside a transaction: committed at the end, rolled back on error."""
        with self._lock, self._conn:
            yield self._conn

    def add(self, record: LogRecord) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self._transaction() as conn:
            conn.execute(f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES ({placeholders})", astuple(record))

    def records(self) -> list[LogRecord]:
        with self._transaction() as conn:
            rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM predictions ORDER BY id").fetchall()
        return [LogRecord(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
