"""Settings of `covidcxr serve`, with the thread and batch defaults chosen for a small CPU server (measured in
benchmarks/bench_serve.py). They live here, not with the app, so the CLI can state them in its help without
importing the web stack or torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from covidcxr.config._rules import NON_NEGATIVE, PORT, POSITIVE_INT, Rule, check_choice, check_rules
from covidcxr.config.monitor import WINDOW, parse_window

SERVE_THREADS = max(1, (os.cpu_count() or 1) - 1)  # torch intra-op threads: all cores but one, left for decoding
REQUEST_THREADS = 4  # threads reading and decoding uploads: enough to keep the model fed, few enough not to thrash
MAX_BATCH = 16  # images per forward pass
MAX_WAIT_MS = 2.0  # how long the first image of a batch waits for company
SHIFT_BATCH = 100  # predictions per test of the shift alarm: consecutive batches, each tested once (trust/shift.py)
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a large uncompressed DICOM radiograph is ~20-30 MB
ENGINES = ("onnx", "torch")  # the first is the default: onnxruntime keeps torch (~530 MB resident) out of the server
LOG_FILE = "predictions.sqlite"  # the prediction log's name in the run folder, unless `db` says otherwise


@dataclass
class ServeConfig:
    """How the service runs; saved beside its prediction log, so a log says which settings answered. The access
    token itself is never a setting (only the file it is read from): settings are written to disk."""

    run: str = ""  # run folder whose model answers
    host: str = "127.0.0.1"  # loopback only by default; any other address needs a token or no_auth
    port: int = 8000
    db: str | None = None  # SQLite prediction log; None: RUN/predictions.sqlite
    token_file: str | None = None  # file holding the access token; None: $COVIDCXR_TOKEN, if set
    no_auth: bool = False  # serve beyond loopback without a token
    threads: int = SERVE_THREADS  # CPU threads of the model's batched forward passes
    request_threads: int = REQUEST_THREADS
    engine: str = ENGINES[0]  # onnx: the run's exported graphs on onnxruntime; torch: torch itself
    access_log: bool = False  # uvicorn's line per request (every prediction is in the SQLite log anyway)
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_batch: int = MAX_BATCH
    max_wait_ms: float = MAX_WAIT_MS
    shift_batch: int = SHIFT_BATCH
    keep_images: str | None = None  # folder to keep each scored file in (for `feedback export`); None: keep none
    monitor_window: str = WINDOW  # the window /api/health and the page summarise (as `covidcxr monitor --window`)

    def __post_init__(self) -> None:
        """Check every setting when made: a bad one is one line, before the port is bound."""
        check_rules(self, _SERVE_RULES)
        check_choice("engine", self.engine, ENGINES)
        parse_window(self.monitor_window)

    def log_path(self, run_dir: str | Path) -> Path:
        """The SQLite prediction log: `db`, else the log in the folder of the run that answers."""
        return Path(self.db) if self.db else Path(run_dir) / LOG_FILE


_SERVE_RULES: dict[str, Rule] = {
    "port": PORT, "threads": POSITIVE_INT, "request_threads": POSITIVE_INT, "max_upload_bytes": POSITIVE_INT,
    "max_batch": POSITIVE_INT, "max_wait_ms": NON_NEGATIVE, "shift_batch": POSITIVE_INT,
}
