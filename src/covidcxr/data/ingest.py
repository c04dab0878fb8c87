"""Ingest: database folders -> manifest + uint8 cache + report, on all cores, incrementally, never stopped by one bad file."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from covidcxr.data import sources
from covidcxr.data.cache import MANIFEST_FILE, ImageCache, to_square
from covidcxr.config import IngestConfig, save_json, to_dict
from covidcxr.data.manifest import MANIFEST_COLUMNS, content_hash, find_duplicates, manifest_hash, perceptual_hash, thumbnail
from covidcxr.data.reader import ImageReadError, read_image

REPORT_FILE = "ingest_report.json"
DUPLICATES_FILE = "duplicates.csv"
# Durable saves of the manifest during a long ingest, so a crash keeps its work. Each save runs the duplicate search
# over everything (quadratic), so saves are spaced by time and by their own cost: at most SAVE_OVERHEAD of the run.
SAVE_INTERVAL_S = 60.0
SAVE_OVERHEAD = 0.1


@dataclass
class IngestReport:
    layouts: dict[str, str] = field(default_factory=dict)
    listed: int = 0
    processed: int = 0
    reused: int = 0
    unreadable: list[dict] = field(default_factory=list)
    duplicates: int = 0
    label_conflicts: int = 0
    kept: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    manifest_hash: str = ""
    config: dict = field(default_factory=dict)


def _decode(job: tuple[str, int, str]) -> dict:
    """Worker: read, hash and square one file. Errors come back as values so one file never stops the pool."""
    path, size, square = job
    try:
        img = read_image(path)
        return {"path": path, "sha1": content_hash(path), "phash": perceptual_hash(img), "thumb": thumbnail(img),
                "orig_height": img.shape[0], "orig_width": img.shape[1], "image": to_square(img, size, square)}
    except ImageReadError as exc:
        return {"path": path, "error": exc.reason}
    except Exception as exc:  # a decoder bug must not lose the other images; the reason is reported per file
        return {"path": path, "error": f"unexpected {type(exc).__name__}: {exc}"}


def _list_rows(roots: list[Path], layout: str, report: IngestReport) -> pd.DataFrame:
    frames = []
    for order, root in enumerate(roots):
        rows, chosen = sources.load_source(root, layout)
        report.layouts[str(root)] = chosen
        frames.append(rows.assign(_order=order))
    rows = pd.concat(frames, ignore_index=True).drop_duplicates("path")
    for col in ("view", "finding", "age_group", "sex"):
        rows[col] = rows.get(col, pd.Series("", index=rows.index)).fillna("").astype(str)
    rows["patient_id"] = rows["patient_id"].astype(str)
    return rows


def _stat(rows: pd.DataFrame, report: IngestReport) -> pd.DataFrame:
    mtimes, sizes = [], []
    for path in rows["path"]:
        try:
            st = os.stat(path)
            mtimes.append(st.st_mtime_ns)
            sizes.append(st.st_size)
        except OSError:
            mtimes.append(-1)
            sizes.append(-1)
    rows = rows.assign(mtime=mtimes, size_bytes=sizes)
    missing = rows["mtime"] < 0
    report.unreadable += [{"path": p, "reason": "file listed but missing"} for p in rows.loc[missing, "path"]]
    return rows[~missing]


def _previous(out: Path) -> pd.DataFrame:
    path = out / MANIFEST_FILE
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=MANIFEST_COLUMNS)


def ingest(roots: list[str | Path], out: str | Path, cfg: IngestConfig | None = None) -> IngestReport:
    """Build or update DATA from the given database folders; returns the report (also written as ingest_report.json)."""
    cfg = cfg or IngestConfig()
    out = Path(out)
    start = time.time()
    report = IngestReport(config=to_dict(cfg))
    rows = _stat(_list_rows([Path(r).resolve() for r in roots], cfg.layout, report), report)
    report.listed = len(rows) + len(report.unreadable)
    out.mkdir(parents=True, exist_ok=True)  # only once the sources are known to be usable

    cache = ImageCache(out, size=cfg.size, mode="r+", square=cfg.square)
    prev = _previous(out).set_index("path")
    known = rows["path"].isin(prev.index)
    same = known & rows["path"].map(lambda p: (prev.at[p, "mtime"], prev.at[p, "size_bytes"]) if p in prev.index else None).eq(
        list(zip(rows["mtime"], rows["size_bytes"])))
    hash_cols = ["sha1", "phash", "thumb", "orig_height", "orig_width", "cache_index"]
    done = rows[same].join(prev[hash_cols], on="path")
    todo = rows[~same].copy()
    report.reused = len(done)
    # changed files keep their slot; new files get slots after the last one in use
    todo["cache_index"] = todo["path"].map(prev["cache_index"]) if len(prev) else np.nan
    next_slot = int(prev["cache_index"].max()) + 1 if len(prev) else 0
    new = todo["cache_index"].isna()
    todo.loc[new, "cache_index"] = np.arange(next_slot, next_slot + int(new.sum()))
    cache.reserve(int(max(todo["cache_index"].max() if len(todo) else -1, next_slot - 1)) + 1)
    cache.write_meta()

    finished: list[dict] = []  # filled by _decode_all; every save writes what is in it so far
    try:
        _decode_all(todo, cache, cfg, report, finished,
                    lambda: _save(out, done, todo, finished, cache, report, cfg))
    finally:
        report.seconds = round(time.time() - start, 2)
        report.images_per_s = round(report.processed / max(report.seconds, 1e-9), 1)
        _save(out, done, todo, finished, cache, report, cfg)
    return report


def _decode_all(todo: pd.DataFrame, cache: ImageCache, cfg: IngestConfig, report: IngestReport,
                finished: list[dict], checkpoint) -> None:
    slots = dict(zip(todo["path"], todo["cache_index"].astype(int)))
    jobs = [(p, cfg.size, cfg.square) for p in todo["path"]]
    workers = cfg.workers or os.cpu_count() or 1
    next_save = time.monotonic() + SAVE_INTERVAL_S
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool, \
            tqdm(total=len(jobs), desc="ingest", unit="img", disable=not jobs) as bar:
        for result in pool.map(_decode, jobs, chunksize=16):
            bar.update()
            if "error" in result:
                report.unreadable.append({"path": result["path"], "reason": result["error"]})
                tqdm.write(f"unreadable: {result['path']}: {result['error']}")
                continue
            cache.write(slots[result["path"]], result.pop("image"))
            finished.append(result)
            report.processed += 1
            if time.monotonic() >= next_save:
                started = time.monotonic()
                checkpoint()
                spent = time.monotonic() - started
                next_save = time.monotonic() + max(SAVE_INTERVAL_S, spent / SAVE_OVERHEAD)


def _save(out: Path, done: pd.DataFrame, todo: pd.DataFrame, finished: list[dict], cache: ImageCache,
          report: IngestReport, cfg: IngestConfig) -> None:
    """Write cache, manifest, duplicates and report; called periodically and at the end (also after an interrupt)."""
    cache.flush()
    fresh = todo.drop(columns=["cache_index"]).merge(pd.DataFrame(finished, columns=["path", "sha1", "phash", "thumb", "orig_height", "orig_width"]), on="path")
    fresh["cache_index"] = fresh["path"].map(dict(zip(todo["path"], todo["cache_index"])))
    table = pd.concat([done, fresh], ignore_index=True)
    table = table.assign(_pixels=-(table["orig_height"].astype(int) * table["orig_width"].astype(int)))
    table = table.sort_values(["_order", "_pixels", "path"], kind="stable").reset_index(drop=True)
    dups = find_duplicates(table, cfg.near_duplicate_corr, cfg.conflict_duplicate_corr)
    copy_of = dict(zip(dups["path"], dups["duplicate_of"]))
    table["duplicate_of"] = [copy_of.get(p, "") for p in table["path"]]
    table["cache_index"] = table["cache_index"].astype(np.int64)
    table = table[MANIFEST_COLUMNS]
    tmp = out / (MANIFEST_FILE + ".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out / MANIFEST_FILE)
    dups.to_csv(out / DUPLICATES_FILE, index=False)
    kept = table[table["duplicate_of"] == ""]
    report.duplicates, report.label_conflicts = len(dups), int(dups["label_conflict"].sum())
    report.kept, report.manifest_hash = len(kept), manifest_hash(kept) if len(kept) else ""
    save_json(report, out / REPORT_FILE)


def summarize(data_dir: str | Path) -> str:
    """Label x source table with patients, duplicates and unreadable files, for `covidcxr data summary`."""
    data_dir = Path(data_dir)
    cache = ImageCache(data_dir)
    df = cache.manifest()
    report = json.loads((data_dir / REPORT_FILE).read_text()) if (data_dir / REPORT_FILE).exists() else {}
    table = pd.crosstab(df["source"], df["label"], margins=True, margins_name="all")
    table["patients"] = df.groupby("source")["patient_id"].nunique().reindex(table.index)
    table.loc["all", "patients"] = df["patient_id"].nunique()
    table["patients"] = table["patients"].astype(int)
    lines = [f"data: {data_dir}  ({cache.size} px cache, manifest {report.get('manifest_hash', '?')})",
             table.to_string(), "",
             f"images kept: {len(df)}   duplicates dropped: {report.get('duplicates', 0)} "
             f"(label conflicts: {report.get('label_conflicts', 0)})   unreadable: {len(report.get('unreadable', []))}"]
    lines += [f"  unreadable: {u['path']}: {u['reason']}" for u in report.get("unreadable", [])[:20]]
    if len(report.get("unreadable", [])) > 20:
        lines.append(f"  ... and {len(report['unreadable']) - 20} more in {data_dir / REPORT_FILE}")
    return "\n".join(lines)
