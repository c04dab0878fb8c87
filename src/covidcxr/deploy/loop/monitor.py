"""The prediction log over time: per window, what came in, what was refused, what the model called, whether the
scores still look like validation's (the shift alarm) and how often readers agreed; across windows, a CUSUM on the
readers' disagreement that alerts when it rises.

Windows are a time span (7d, 24h: counted from the first prediction read) or a number of predictions; a window never
spans two models: a new model id (an adapted run served) starts a new segment, with its own reference and its own
CUSUM. The CUSUM (Bernoulli, Page 1954) takes each verdict in the order its prediction was made; x = 1 when the reader
disagrees with the model. It adds x ln(p1/p0) + (1-x) ln((1-p1)/(1-p0)) and stops at 0 from below, with p0 the
disagreement expected from the model's validation split and p1 = p0 + rise; it alerts at h = ln(in_control_run), so
that while the rate stays at p0 a false alert comes at most once per in_control_run verdicts on average (Lorden's
bound), then starts again from 0.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.config import MonitorConfig, parse_window, to_dict
from covidcxr.errors import InputError
from covidcxr.trust.shift import rate_ci, shift_test

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)  # the score distribution of a window, beside the reference's


def read_log(db: str | Path, since: str | None = None, last: int | None = None, model_id: str | None = None,
             judged_only: bool = False) -> tuple[pd.DataFrame, dict[str, dict]]:
    """(predictions with each one's latest verdict, models by id) from a prediction log; only those made on or after
    `since`, only the `last` ones, only one model's, only those with a verdict, as asked."""
    path = Path(db)
    if not path.is_file():
        raise InputError(f"{path}: no such prediction log (covidcxr serve --db, or a pacs --state file)")
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"predictions", "verdicts", "models"} <= tables:
            raise InputError(f"{path}: not a covidcxr prediction log, or one written before verdicts were recorded "
                             "(start covidcxr serve on it once to bring it up to date)")
        where: list[str] = []
        params: list[str] = []
        for condition, value in (("p.time_utc >= ?", since), ("p.model_id = ?", model_id)):
            if value:
                where, params = [*where, condition], [*params, value]
        if judged_only:
            where.append("v.verdict IS NOT NULL")
        sql = ("SELECT p.id, p.time_utc, p.sha256, p.probability, p.threshold, p.model_id, p.status, p.reason, "
               "p.patient_id, p.image_path, p.filename, v.verdict, v.reader FROM predictions p LEFT JOIN "
               "(SELECT v.prediction_id, v.label AS verdict, v.reader FROM verdicts v JOIN (SELECT MAX(id) AS id FROM "
               "verdicts GROUP BY prediction_id) m ON v.id = m.id) v ON v.prediction_id = p.id"
               + (" WHERE " + " AND ".join(where) if where else "")
               + (f" ORDER BY p.id DESC LIMIT {int(last)}" if last else " ORDER BY p.id"))
        frame = pd.read_sql_query(sql, conn, params=params)
        models = {row[0]: {"model_id": row[0], "run": row[1], "threshold": row[2], "positive_label": row[3],
                           "reference": np.asarray(json.loads(row[4]), float), "expected_disagreement": row[5]}
                  for row in conn.execute("SELECT model_id, run, threshold, positive_label, reference, "
                                          "expected_disagreement FROM models")}
    frame = frame.iloc[::-1].reset_index(drop=True) if last else frame
    frame["time"] = pd.to_datetime(frame["time_utc"], utc=True, format="ISO8601")
    return frame, models


COUNTS = ("n", "agree", "tp", "pos", "tn", "neg")  # what the readers' figures are made of


def _counts(called: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """COUNTS of judged predictions: how many, agreeing, true positives, reader positives, true negatives, negatives."""
    return np.array([len(called), (called == truth).sum(), (called & truth).sum(), truth.sum(),
                     (~called & ~truth).sum(), (~truth).sum()], dtype=int)


def readers(counts: np.ndarray) -> dict:
    """Agreement with readers, and the model's sensitivity and specificity with the readers' verdicts as truth."""
    k = dict(zip(COUNTS, (int(c) for c in counts)))
    return {"verdicts": k["n"], "agreement": rate_ci(k["agree"], k["n"]),
            "sensitivity": rate_ci(k["tp"], k["pos"]), "specificity": rate_ci(k["tn"], k["neg"])}


def _model_info(models: dict[str, dict], model_id: str) -> dict:
    """What the log knows of a model: a model the log did not record (an older log) has no reference."""
    return models.get(model_id) or {"reference": np.zeros(0), "positive_label": "covid",
                                    "expected_disagreement": None}


class _Columns:
    """The log as numpy arrays, so a window is a slice of positions, not a pandas selection (a monitor of 100,000
    predictions computes a thousand windows)."""

    def __init__(self, frame: pd.DataFrame, models: dict[str, dict]):
        self.id = frame["id"].to_numpy()
        self.time = frame["time_utc"].to_numpy(object)
        self.model = frame["model_id"].to_numpy(object)
        self.status = frame["status"].to_numpy(object)
        self.reason = frame["reason"].to_numpy(object)
        self.scored = self.status == "scored"
        self.score = frame["probability"].to_numpy(float)
        self.threshold = frame["threshold"].to_numpy(float)
        self.called = np.nan_to_num(self.score, nan=-1.0) >= self.threshold
        positive = frame["model_id"].map(lambda m: _model_info(models, m)["positive_label"]).to_numpy(object)
        self.judged = self.scored & frame["verdict"].notna().to_numpy()
        self.truth = frame["verdict"].to_numpy(object) == positive


def window_summary(cols: _Columns, at: np.ndarray, model: dict) -> dict:
    """One window (positions `at` of the log): volume, refusals by reason, the share called positive and the score
    distribution against the reference, the shift alarm, and the readers' verdicts."""
    scored = at[cols.scored[at]]
    scores, threshold = cols.score[scored], float(cols.threshold[at[0]])
    reference = model["reference"]
    judged = at[cols.judged[at]]
    refused = Counter(f"{cols.status[i]}: {cols.reason[i]}" for i in at[~cols.scored[at]])
    return {
        "start": cols.time[at[0]], "end": cols.time[at[-1]], "first_id": int(cols.id[at[0]]),
        "last_id": int(cols.id[at[-1]]), "model_id": cols.model[at[0]], "volume": len(at), "scored": len(scored),
        "refused": dict(refused.most_common()),
        "positive_rate": rate_ci(int(cols.called[scored].sum()), len(scored)),
        "reference_positive_rate": float((reference >= threshold).mean()) if len(reference) else None,
        "score_quantiles": np.quantile(scores, QUANTILES).tolist() if len(scores) else None,
        "reference_quantiles": np.quantile(reference, QUANTILES).tolist() if len(reference) else None,
        "shift": (shift_test(reference, scores, threshold, model["positive_label"]) if len(reference)
                  else {"alarm": False, "message": "no verdict: the log holds no validation scores for this model"}),
        "readers": readers(_counts(cols.called[judged], cols.truth[judged])),
    }


def _window_keys(frame: pd.DataFrame, window: str, origin: pd.Timestamp) -> pd.Series:
    """Each prediction's window within its segment: by time from `origin`, or by count within the segment."""
    size, unit = parse_window(window)
    if unit:
        width = pd.Timedelta(days=size) if unit == "d" else pd.Timedelta(hours=size)
        return (frame["time"] - origin) // width
    return frame.groupby("segment").cumcount() // size


def cusum(disagree: np.ndarray, p0: float, rise: float, in_control_run: int) -> tuple[np.ndarray, list[int]]:
    """The Bernoulli CUSUM path over 0/1 disagreements and the indices where it alerted (restarting from 0)."""
    p1 = min(p0 + rise, 0.999)
    up, down = math.log(p1 / p0), math.log((1 - p1) / (1 - p0))
    h = math.log(in_control_run)
    path, alerts, s = np.zeros(len(disagree)), [], 0.0
    for i, x in enumerate(disagree):
        s = max(0.0, s + (up if x else down))
        path[i] = s
        if s >= h:
            alerts.append(i)
            s = 0.0
    return path, alerts


def sequential(cols: _Columns, segments: np.ndarray, windows: np.ndarray, models: dict[str, dict],
               cfg: MonitorConfig) -> list[dict]:
    """Per segment, the CUSUM on the readers' disagreement: its settings, its path and every alert (which window,
    which threshold, how many verdicts)."""
    out = []
    h = math.log(cfg.in_control_run)
    for segment in np.unique(segments):
        at = np.flatnonzero((segments == segment) & cols.judged)
        model_id = cols.model[np.flatnonzero(segments == segment)[0]]
        model = _model_info(models, model_id)
        p0 = model["expected_disagreement"] or cfg.baseline_disagreement
        p1 = min(p0 + cfg.rise, 0.999)
        path, alerts = cusum(cols.called[at] != cols.truth[at], p0, cfg.rise, cfg.in_control_run)
        found = [{"window": int(windows[at[i]]), "verdicts_used": i + 1, "prediction_id": int(cols.id[at[i]]),
                  "statistic": float(path[i]),
                  "message": f"readers disagree with the model more often than expected: the CUSUM crossed "
                             f"h = {h:.2f} after {i + 1} verdicts (baseline disagreement {p0:.0%}, tuned to find "
                             f"{p1:.0%})"} for i in alerts]
        out.append({"segment": int(segment), "model_id": model_id,
                    "test": "Bernoulli CUSUM on the readers' disagreement", "p0": p0, "p1": p1, "h": h,
                    "baseline": "the model's validation split" if model["expected_disagreement"] else
                    "the default (the log holds no validation figure for this model)",
                    "in_control_run": cfg.in_control_run, "verdicts": len(at), "alerts": found,
                    "path": [round(float(v), 4) for v in path], "path_window": windows[at].astype(int).tolist()})
    return out


def monitor(frame: pd.DataFrame, models: dict[str, dict], cfg: MonitorConfig) -> dict:
    """Windows and the sequential test over a log read by `read_log`."""
    if frame.empty:
        return {"settings": to_dict(cfg), "n_predictions": 0, "windows": [], "segments": [], "sequential": [],
                "alert": None, "current": None}
    frame = frame.assign(segment=(frame["model_id"] != frame["model_id"].shift()).cumsum() - 1)
    frame = frame.assign(local=_window_keys(frame, cfg.window, frame["time"].iloc[0]))
    window_of = frame.groupby(["segment", "local"], sort=False).ngroup().to_numpy()
    segments = frame["segment"].to_numpy()
    cols = _Columns(frame, models)
    windows, so_far, segment = [], np.zeros(len(COUNTS), int), -1
    for index, at in sorted(pd.Series(window_of).groupby(window_of).indices.items()):
        if segments[at[0]] != segment:
            so_far, segment = np.zeros(len(COUNTS), int), segments[at[0]]
        judged = at[cols.judged[at]]
        so_far = so_far + _counts(cols.called[judged], cols.truth[judged])
        summary = window_summary(cols, at, _model_info(models, cols.model[at[0]]))
        windows.append({"window": int(index), "segment": int(segment), **summary, "readers_so_far": readers(so_far)})
    seq = sequential(cols, segments, window_of, models, cfg)
    alerts = [a | {"model_id": s["model_id"]} for s in seq for a in s["alerts"]]
    segment_list = [{"segment": s["segment"], "model_id": s["model_id"],
                     "windows": [w["window"] for w in windows if w["segment"] == s["segment"]]} for s in seq]
    return {"settings": to_dict(cfg), "n_predictions": len(frame), "windows": windows, "segments": segment_list,
            "sequential": seq, "alert": alerts[-1] if alerts else None, "current": windows[-1]}


def since_for_current(window: str, now: datetime | None = None) -> tuple[str | None, int | None]:
    """What to read for the current window only: (since, last) for a time span or a number of predictions."""
    size, unit = parse_window(window)
    if not unit:
        return None, size
    now = now or datetime.now(timezone.utc)
    return (now - (timedelta(days=size) if unit == "d" else timedelta(hours=size))).isoformat(), None


def current(db: str | Path, model_id: str, window: str) -> dict:
    """The service's view: the latest window of this model (the trailing span or count) and the sequential alert over
    all of this model's verdicts. Reads only those rows, so it stays quick on a long log."""
    cfg = MonitorConfig(window=window)
    since, last = since_for_current(window)
    recent, models = read_log(db, since=since, last=last, model_id=model_id)
    judged, _ = read_log(db, model_id=model_id, judged_only=True)
    out: dict = {"window": window, "current": None, "alert": None}
    if not recent.empty:
        out["current"] = window_summary(_Columns(recent, models), np.arange(len(recent)), _model_info(models, model_id))
    if not judged.empty:
        seq = sequential(_Columns(judged, models), np.zeros(len(judged), int), np.zeros(len(judged), int), models, cfg)
        out["alert"] = seq[0]["alerts"][-1] if seq[0]["alerts"] else None
        out["verdicts"] = seq[0]["verdicts"]
    return out
