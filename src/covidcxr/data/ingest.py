"""Ingest: database folders -> manifest + uint8 cache + report, on all cores, never stopped by one bad file or row.

On an existing data folder ingest adds. Each manifest row remembers the source folder (`root`) that listed it, so
re-ingesting a folder updates only its rows (new, changed and removed files; nothing unchanged is decoded again) and
the other folders' rows are carried over as they are. No kept row's cache slot ever moves, so runs trained earlier
keep evaluating. `replace` rebuilds from the given folders alone (still reusing their decoded images).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from covidcxr.config import IngestConfig, save_json, to_dict
from covidcxr.data import sources
from covidcxr.data.cache import MANIFEST_FILE, ImageCache, to_square
from covidcxr.data.manifest import (
    MANIFEST_COLUMNS,
    content_hash,
    find_duplicates,
    manifest_hash,
    perceptual_hash,
    thumbnail,
)
from covidcxr.data.reader import ImageReadError, ImageRefused, dicom_fields, read_image
from covidcxr.data.sources import age_group, sex, study_date

log = logging.getLogger(__name__)

REPORT_FILE = "ingest_report.json"
# A gate as ingest sees it: cache squares (N, S, S) uint8 -> each one's refusal reason, or None to accept it. The CLI
# passes a run's (covidcxr.trust.gate), which this stage cannot import: a gate is fitted on data ingested first.
RefusalCheck = Callable[[np.ndarray], list[str | None]]
DUPLICATES_FILE = "duplicates.csv"
# The manifest as ingest writes it: each row also remembers the source folder that listed it, so that re-ingesting a
# folder updates exactly its rows and leaves the other folders' rows alone.
COLUMNS = [*MANIFEST_COLUMNS, "root"]
# Subgroup fields a DICOM header can fill where the source's listing leaves them empty (ingest keeps them per row)
HEADER_FIELDS = ("view", "age_group", "sex", "modality", "manufacturer", "date")
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
    carried_over: int = 0  # rows of source folders not given this time, kept as they were
    unreadable: list[dict] = field(default_factory=list)
    # files that are not frontal chest radiographs: by their DICOM tags, or by a gate (--gate); left out of the
    # manifest unless keep_refused
    refused: list[dict] = field(default_factory=list)
    bad_rows: list[dict] = field(default_factory=list)  # rows a source lists but that cannot be used (e.g. bad label)
    removed: dict[str, int] = field(default_factory=dict)  # per source: rows whose files are gone or now unreadable
    dropped: dict[str, int] = field(default_factory=dict)  # per source: rows of folders that a replace left out
    duplicates: int = 0
    label_conflicts: int = 0
    kept: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    manifest_hash: str = ""
    config: dict = field(default_factory=dict)


@dataclass
class _Plan:
    """What one ingest does to DATA's rows."""
    kept: pd.DataFrame  # rows written as they are: other folders' rows and unchanged files (nothing decoded)
    todo: pd.DataFrame  # rows to decode, each with the cache slot it fills
    own: pd.DataFrame  # the earlier rows of the given folders: those not written again count as removed
    finished: list[dict] = field(default_factory=list)  # decoded so far; every save writes what is in it


def _decode(job: tuple[str, int, str]) -> dict:
    """Worker: read, hash and square one file. Errors come back as values so one file never stops the pool."""
    path, size, square = job
    try:
        img = read_image(path)
        return {"path": path, "sha1": content_hash(path), "phash": perceptual_hash(img), "thumb": thumbnail(img),
                "orig_height": img.shape[0], "orig_width": img.shape[1], "image": to_square(img, size, square),
                "header": _header_fields(path)}
    except ImageRefused as exc:
        return {"path": path, "refused": exc.reason}
    except ImageReadError as exc:
        return {"path": path, "error": exc.reason}
    except Exception as exc:  # a decoder bug must not lose the other images; the reason is reported per file
        return {"path": path, "error": f"unexpected {type(exc).__name__}: {exc}"}


def _header_fields(path: str) -> dict[str, str]:
    """A DICOM's subgroup fields as the manifest writes them ({} for other files)."""
    tags = dicom_fields(path)
    if not tags:
        return {}
    return {"view": tags["view"], "age_group": age_group(tags["age"]) if tags["age"] else "", "sex": sex(tags["sex"]),
            "modality": tags["modality"].upper(), "manufacturer": tags["manufacturer"],
            "date": study_date(tags["date"]) if tags["date"] else ""}


def _fill_fields(rows: pd.DataFrame, known: pd.DataFrame) -> pd.DataFrame:
    """Each of HEADER_FIELDS left empty (or 'unknown') by the listing, taken from `known` (same index) instead."""
    for col in HEADER_FIELDS:
        if col in known:
            empty = rows[col].isin(["", "unknown"]) & known[col].fillna("").ne("")
            rows.loc[empty, col] = known.loc[empty, col]
    return rows


def _entry(row: dict, reason: str) -> dict:
    """A skipped row or file for the report: its path, the reason and, for a CSV row, the CSV and line to fix."""
    where = {"csv": row["listed_in"], "line": int(row["line"])} if row.get("listed_in") else {}
    return {"path": row["path"], "reason": reason, **where}


def describe(entry: dict) -> str:
    """One line for a report entry, led by the CSV line when there is one."""
    where = f"{entry['csv']} line {entry['line']}: " if "csv" in entry else ""
    return f"{where}{entry['path'] or '(no path)'}: {entry['reason']}"


def _list_rows(roots: list[Path], layout: str, report: IngestReport) -> pd.DataFrame:
    """The usable rows of every source folder; the rows a source rejects go to the report, each with its reason."""
    frames = []
    for root in roots:
        rows, chosen = sources.load_source(root, layout)
        report.layouts[str(root)] = chosen
        log.debug("%s: layout %s", root, chosen)
        frames.append(rows.assign(root=str(root)))
    rows = pd.concat(frames, ignore_index=True)
    bad = rows["problem"] != ""
    report.bad_rows += [_entry(row, row["problem"]) for row in rows[bad].to_dict("records")]
    rows = rows[~bad].drop_duplicates("path")
    for col in ("view", "finding", "age_group", "sex", "modality", "manufacturer", "date"):
        rows[col] = rows.get(col, pd.Series("", index=rows.index)).fillna("").astype(str)
    rows["patient_id"] = rows["patient_id"].astype(str)
    return rows


def _stat(rows: pd.DataFrame, report: IngestReport) -> pd.DataFrame:
    """mtime and size of each listed file; paths that are no readable regular file (missing, a broken link, a folder
    that cannot be read) are reported with the reason and left out."""
    problems = rows["path"].map(sources.file_problem)
    bad = problems != ""
    report.unreadable += [_entry(row, why) for row, why in zip(rows[bad].to_dict("records"), problems[bad])]
    rows = rows[~bad]
    stats = [os.stat(path) for path in rows["path"]]
    return rows.assign(mtime=[st.st_mtime_ns for st in stats], size_bytes=[st.st_size for st in stats])


def _previous(out: Path) -> pd.DataFrame:
    """DATA's manifest so far (empty when new); rows written before manifests knew their folder get root ''."""
    path = out / MANIFEST_FILE
    df = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=COLUMNS)
    df = df.assign(**{c: "" for c in ("modality", "manufacturer", "date") if c not in df})  # manifests before them
    return df if "root" in df else df.assign(root="")


def _per_source(rows: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in rows.groupby("source").size().items()}


def _plan(rows: pd.DataFrame, roots: list[str], prev: pd.DataFrame, replace: bool, report: IngestReport) -> _Plan:
    """Split the listed rows into reused (unchanged file) and to-decode ones, with cache slots that never move: a
    changed file keeps its slot, a new one gets a slot after every slot ever used. The rows of folders not given are
    carried over, or with `replace` dropped and counted."""
    others = ~prev["root"].isin(roots) & ~prev["path"].isin(rows["path"])
    if replace:
        report.dropped = _per_source(prev[others])
    carried = prev.iloc[:0] if replace else prev[others]
    # duplicate priority: folders already in DATA keep their place (an image kept before stays kept), new ones follow
    # in the order given; a replace uses the order given
    known = [] if replace else list(prev["root"])
    order = {root: i for i, root in enumerate(dict.fromkeys([*known, *roots]))}
    rows, carried = rows.assign(_order=rows["root"].map(order)), carried.assign(_order=carried["root"].map(order))
    by_path = prev.set_index("path")
    old = rows[["path"]].join(by_path[["mtime", "size_bytes"]], on="path")
    same = old["mtime"].eq(rows["mtime"]) & old["size_bytes"].eq(rows["size_bytes"])
    hash_cols = ["sha1", "phash", "thumb", "orig_height", "orig_width", "cache_index"]
    done = rows[same].join(by_path[hash_cols], on="path")
    done = _fill_fields(done, done[["path"]].join(by_path[list(HEADER_FIELDS)], on="path"))  # header-filled before
    todo = rows[~same].copy()
    todo["cache_index"] = todo["path"].map(by_path["cache_index"]) if len(prev) else np.nan
    next_slot = int(prev["cache_index"].max()) + 1 if len(prev) else 0
    new = todo["cache_index"].isna()
    todo.loc[new, "cache_index"] = np.arange(next_slot, next_slot + int(new.sum()))
    report.reused, report.carried_over = len(done), len(carried)
    return _Plan(kept=pd.concat([carried, done], ignore_index=True), todo=todo, own=prev[~others])


def ingest(roots: list[str | Path], out: str | Path, cfg: IngestConfig | None = None,
           replace: bool = False, gate: RefusalCheck | None = None, keep_refused: bool = False) -> IngestReport:
    """Add the given database folders to DATA (or build it); returns the report (also written as ingest_report.json).

    A folder ingested before is updated: only its new and changed files are decoded, its vanished files' rows are
    removed (counted in the report), and other folders' rows stay. `replace` keeps only the given folders' rows.
    `gate` (a run's, covidcxr.trust.gate) gives each decoded square's refusal reason, or None to accept it: refused
    files are listed in the report and left out, unless `keep_refused`."""
    cfg = cfg or IngestConfig()
    out = Path(out)
    start = time.time()
    report = IngestReport(config=to_dict(cfg))
    resolved = [Path(r).resolve() for r in roots]
    rows = _stat(_list_rows(resolved, cfg.layout, report), report)
    report.listed = len(rows) + len(report.unreadable) + len(report.bad_rows)
    out.mkdir(parents=True, exist_ok=True)  # only once the sources are known to be usable

    cache = ImageCache(out, size=cfg.size, mode="r+", square=cfg.square)
    prev = _previous(out)
    plan = _plan(rows, [str(r) for r in resolved], prev, replace, report)
    slots = plan.todo["cache_index"]
    cache.reserve(max(int(slots.max()) if len(slots) else -1, int(prev["cache_index"].max()) if len(prev) else -1) + 1)
    cache.write_meta()

    try:
        _decode_all(plan, cache, cfg, report, lambda: _save(out, plan, cache, report, cfg), gate, keep_refused)
    finally:
        report.seconds = round(time.time() - start, 2)
        report.images_per_s = round(report.processed / max(report.seconds, 1e-9), 1)
        _save(out, plan, cache, report, cfg)
    return report


def _decode_all(plan: _Plan, cache: ImageCache, cfg: IngestConfig, report: IngestReport, checkpoint,
                gate: RefusalCheck | None = None, keep_refused: bool = False) -> None:
    todo = plan.todo
    slots = dict(zip(todo["path"], todo["cache_index"].astype(int)))
    listed = dict(zip(todo["path"], todo.to_dict("records")))
    jobs = [(p, cfg.size, cfg.square) for p in todo["path"]]
    workers = cfg.workers or os.cpu_count() or 1
    next_save = time.monotonic() + SAVE_INTERVAL_S
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool, \
            tqdm(total=len(jobs), desc="ingest", unit="img", disable=not jobs) as bar:
        for result in pool.map(_decode, jobs, chunksize=16):
            bar.update()
            if "error" in result:
                report.unreadable.append(_entry(listed[result["path"]], result["error"]))
                log.warning("unreadable: %s", describe(report.unreadable[-1]))
                continue
            if "refused" in result:  # by its DICOM tags: not decoded, so never kept
                _refuse(report, _entry(listed[result["path"]], result["refused"]), kept=False)
                continue
            reason = gate(result["image"][None])[0] if gate else None
            if reason:
                _refuse(report, _entry(listed[result["path"]], reason), kept=keep_refused)
                if not keep_refused:
                    continue
            cache.write(slots[result["path"]], result.pop("image"))
            plan.finished.append(result)
            report.processed += 1
            if time.monotonic() >= next_save:
                started = time.monotonic()
                checkpoint()
                spent = time.monotonic() - started
                next_save = time.monotonic() + max(SAVE_INTERVAL_S, spent / SAVE_OVERHEAD)


def _refuse(report: IngestReport, entry: dict, kept: bool) -> None:
    report.refused.append({**entry, "kept": kept})
    log.warning("refused%s: %s", " (kept: --keep-refused)" if kept else "", describe(entry))


def _save(out: Path, plan: _Plan, cache: ImageCache, report: IngestReport, cfg: IngestConfig) -> None:
    """Write cache, manifest, duplicates and report; called periodically and at the end (also after an interrupt)."""
    cache.flush()
    todo = plan.todo
    decoded = pd.DataFrame(plan.finished, columns=["path", "sha1", "phash", "thumb", "orig_height", "orig_width",
                                                   "header"])
    fresh = todo.drop(columns=["cache_index"]).merge(decoded, on="path")
    fresh = _fill_fields(fresh, pd.DataFrame(list(fresh["header"]), index=fresh.index)).drop(columns="header")
    fresh["cache_index"] = fresh["path"].map(dict(zip(todo["path"], todo["cache_index"])))
    table = pd.concat([plan.kept, fresh], ignore_index=True)
    table = table.assign(_pixels=-(table["orig_height"].astype(int) * table["orig_width"].astype(int)))
    table = table.sort_values(["_order", "_pixels", "path"], kind="stable").reset_index(drop=True)
    dups = find_duplicates(table, cfg.near_duplicate_corr, cfg.conflict_duplicate_corr)
    copy_of = dict(zip(dups["path"], dups["duplicate_of"]))
    table["duplicate_of"] = [copy_of.get(p, "") for p in table["path"]]
    table["cache_index"] = table["cache_index"].astype(np.int64)
    table = table[COLUMNS]
    tmp = out / (MANIFEST_FILE + ".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out / MANIFEST_FILE)
    dups.to_csv(out / DUPLICATES_FILE, index=False)
    kept = table[table["duplicate_of"] == ""]
    report.removed = _per_source(plan.own[~plan.own["path"].isin(table["path"])])
    report.duplicates, report.label_conflicts = len(dups), int(dups["label_conflict"].sum())
    report.kept, report.manifest_hash = len(kept), manifest_hash(kept) if len(kept) else ""
    save_json(report, out / REPORT_FILE)


def changes(report: IngestReport) -> list[str]:
    """Lines saying what an ingest did to rows already in DATA, so that the manifest never shrinks silently."""
    lines = [f"kept {report.carried_over} row(s) of source folders not given this time"] if report.carried_over else []
    lines += [f"removed {n} row(s) of {source}: their files are gone or no longer readable"
              for source, n in report.removed.items()]
    lines += [f"--replace dropped {n} row(s) of {source}, whose folders were not given"
              for source, n in report.dropped.items()]
    return lines


def summarize(data_dir: str | Path, limit: int | None = 20) -> str:
    """Label x source table with patients, duplicates, and the last ingest's unreadable files and bad rows (the first
    `limit` of each; None: all), for `covidcxr data summary` and the end of `covidcxr ingest`."""
    data_dir = Path(data_dir)
    cache = ImageCache(data_dir)
    df = cache.manifest()
    report = json.loads((data_dir / REPORT_FILE).read_text()) if (data_dir / REPORT_FILE).exists() else {}
    table = pd.crosstab(df["source"], df["label"], margins=True, margins_name="all")
    table["patients"] = df.groupby("source")["patient_id"].nunique().reindex(table.index)
    table.loc["all", "patients"] = df["patient_id"].nunique()
    table["patients"] = table["patients"].astype(int)
    unreadable, bad_rows = report.get("unreadable", []), report.get("bad_rows", [])
    lines = [f"data: {data_dir}  ({cache.size} px cache, manifest {report.get('manifest_hash', '?')})",
             table.to_string(), "",
             f"images kept: {len(df)}   duplicates dropped: {report.get('duplicates', 0)} "
             f"(label conflicts: {report.get('label_conflicts', 0)})   unreadable: {len(unreadable)}   "
             f"bad rows: {len(bad_rows)}"]
    for kind, entries in (("unreadable", unreadable), ("bad row", bad_rows)):
        lines += [f"  {kind}: {describe(e)}" for e in entries[:limit]]
        if limit is not None and len(entries) > limit:
            lines.append(f"  ... and {len(entries) - limit} more in {data_dir / REPORT_FILE}")
    return "\n".join(lines)
