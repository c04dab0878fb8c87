"""What a watcher or listener has done, per SOPInstanceUID, in SQLite: so a restart neither scores twice nor misses.

Statuses: scored (result stored in the PACS), skipped (not a chest radiograph by its tags), refused (the run's gate
refused the image: `reason` says why, and no finding is written), failed (unreadable, or gave up after MAX_ATTEMPTS),
pending (a transient refusal; tried again next time), output (a report or capture covidcxr wrote). Every status but
pending is final.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

MAX_ATTEMPTS = 3
FINAL = ("scored", "skipped", "refused", "failed", "output")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    probability REAL,
    label TEXT,
    threshold REAL,
    model_id TEXT,
    report_uid TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
)"""


class State:
    """The SQLite state file; every write is committed at once, so an interrupted run loses nothing it finished."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute(SCHEMA)
        self.db.commit()

    def is_final(self, sop_uid: str) -> bool:
        row = self.db.execute("SELECT status FROM instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone()
        return row is not None and row[0] in FINAL

    def record(self, sop_uid: str, study_uid: str | None, status: str, **fields) -> None:
        """Insert or replace one instance's row; `fields` are the table's other columns."""
        row = {"sop_instance_uid": sop_uid, "study_instance_uid": study_uid, "status": status, **fields,
               "attempts": self.attempts(sop_uid) + 1, "updated_at": _now()}
        self.db.execute(f"INSERT OR REPLACE INTO instances ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                        tuple(row.values()))
        self.db.commit()

    def postpone(self, sop_uid: str, study_uid: str | None, reason: str) -> bool:
        """Count a transient failure; after MAX_ATTEMPTS it becomes final ('failed'). True when it did."""
        attempts = self.attempts(sop_uid) + 1
        if attempts >= MAX_ATTEMPTS:
            self.record(sop_uid, study_uid, "failed", reason=f"gave up after {attempts} attempts: {reason}")
            return True
        self.db.execute("INSERT OR REPLACE INTO instances (sop_instance_uid, study_instance_uid, status, reason, "
                        "attempts, updated_at) VALUES (?, ?, 'pending', ?, ?, ?)",
                        (sop_uid, study_uid, reason, attempts, _now()))
        self.db.commit()
        return False

    def attempts(self, sop_uid: str) -> int:
        row = self.db.execute("SELECT attempts FROM instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        self.db.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
