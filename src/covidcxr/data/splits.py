"""Patient-level splits: no patient ever appears in two parts of a split, and every stratum is split alike.

Each patient gets a uniform number from a hash of (seed, patient id), and a stratum: its source and label(s). Within a
stratum the patients are ordered by their numbers and dealt into the parts by rank, so every source's positives and
negatives get the requested fractions up to one patient each. A split drawn patient by patient gets them only in
expectation: with a few hundred patients of a source, validation and test then differ in their mix of sources and
labels by chance (one held-out-sources run drew 19 % normal films for validation and 11 % for its test part), and
everything measured against validation (thresholds, the shift alarm's reference) inherits the difference. The price:
adding patients to a stratum can move a few of its patients near a part's edge to the next part, so a grown manifest
gets a new split (each run keeps its own in RUN/split.csv, which evaluation reads). Removing whole sources changes no
other source's split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data import tasks
from covidcxr.errors import InputError, LeakageError

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
INTERNAL_TEST = "internal-test"  # a held-out-sources run's own test part: unseen patients of the sources it trained on


def patient_uniform(patient_ids: pd.Series, seed: int) -> np.ndarray:
    """Stable uniform [0, 1) draw per patient id."""
    def draw(pid: str) -> float:  # a hash, not an RNG: a patient's draw never depends on who else is in the data
        digest = hashlib.blake2b(f"{seed}:{pid}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64
    cache = {pid: draw(pid) for pid in pd.unique(patient_ids)}
    return patient_ids.map(cache).to_numpy(dtype=np.float64)


def stratified_positions(df: pd.DataFrame, seed: int) -> np.ndarray:
    """Per row, its patient's place in [0, 1) among the patients of its stratum (source and labels): rank by the hash
    draw, plus a drawn offset per stratum, over the stratum's size. Each 1/n-wide cell holds one patient, so a cut at
    any fraction puts that fraction of the stratum's patients below it, up to one."""
    pid = df["patient_id"].astype(str)
    stratum = (df["source"].astype(str) + ":" + df["label"].astype(str)).groupby(pid).agg(
        lambda s: "+".join(sorted(set(s))))
    draw = pd.Series(patient_uniform(stratum.index.to_series(), seed), index=stratum.index)
    rank = draw.groupby(stratum).rank(method="first") - 1
    offset = stratum.map(dict(zip(stratum.unique(), patient_uniform(pd.Series(stratum.unique()), seed + 1))))
    place = (rank + offset) / stratum.map(stratum.value_counts())
    return pid.map(place).to_numpy(dtype=np.float64)


def patient_split(df: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> pd.Series:
    """'train' / 'val' / 'test' per row, by patient, stratified by source and label."""
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise InputError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    u = stratified_positions(df, seed)
    edges = np.cumsum(fractions)[:-1]
    parts = np.array(PARTS)[np.searchsorted(edges, u, side="right")]
    split = pd.Series(parts, index=df.index, name="split")
    assert_patient_disjoint(df["patient_id"], split)
    return split


def leave_sources_out(df: pd.DataFrame, held_out: list[str], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                      seed: int = 0) -> pd.Series:
    """Held-out sources are the test part (external validation); the rest is split train / val / INTERNAL_TEST by
    patient with `fractions`, exactly as `patient_split` splits them (strata are within a source), so the run trains
    on the same share as a run on every source, and its own test part is that run's test images of these sources."""
    unknown = set(held_out) - set(df["source"])
    if unknown:
        raise InputError(f"unknown source(s) to hold out: {', '.join(sorted(unknown))}")
    rest = ~df["source"].isin(held_out)
    split = pd.Series("test", index=df.index, name="split")
    split[rest] = patient_split(df[rest], fractions, seed).replace("test", INTERNAL_TEST)
    assert_patient_disjoint(df["patient_id"], split)
    return split


def assert_patient_disjoint(patient_ids: pd.Series, parts: pd.Series) -> None:
    """Raise LeakageError naming the patients found in more than one part."""
    per_patient = pd.DataFrame({"p": patient_ids.astype(str), "s": parts}).groupby("p")["s"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise LeakageError(f"{len(leaked)} patient(s) in more than one split part, e.g. {list(leaked.index[:5])}: "
                           "a patient's images must share one part (hold out every source they appear in, or fix "
                           "their patient_id)")


MIN_CLASS = 10  # a source needs this many images of a class to count as holding it


def external_folds(df: pd.DataFrame, task: str) -> list[list[str]]:
    """Groups of sources to hold out: sources holding both classes alone; one-class sources paired (a positive-only
    with a negative-only one, largest first) so each held-out test has both classes where the data allows; the
    one-class sources left over are held out together (that test gives sensitivity or specificity only)."""
    df = df[tasks.encode(df["label"], task) >= 0]
    pos = df["label"] == "covid"
    counts = pd.DataFrame({"pos": pos.groupby(df["source"]).sum(), "neg": (~pos).groupby(df["source"]).sum()})
    counts = counts.rename_axis("source").reset_index()
    both = counts.loc[(counts["pos"] >= MIN_CLASS) & (counts["neg"] >= MIN_CLASS), "source"].tolist()
    def largest_first(mask: pd.Series, col: str) -> pd.Index:  # ties broken by name, so folds never depend on order
        return pd.Index(counts[mask].sort_values([col, "source"], ascending=[False, True])["source"])
    only_pos = largest_first((counts["pos"] >= MIN_CLASS) & (counts["neg"] < MIN_CLASS), "pos")
    only_neg = largest_first((counts["neg"] >= MIN_CLASS) & (counts["pos"] < MIN_CLASS), "neg")
    folds = [[s] for s in both]
    folds += [[p, n] for p, n in zip(only_pos, only_neg)]
    paired = len(folds) - len(both)
    leftover = list(only_pos[paired:]) + list(only_neg[paired:])
    return folds + ([leftover] if leftover else [])  # the unpaired rest held out together: one more run, not many


def split_file_part(path: Path) -> str:
    """The part a published split file holds, from its name: train.txt, val.txt, test_COVIDx9A.txt ..."""
    name = path.name.lower()
    found = [part for part in PARTS if part in name]
    if len(found) != 1:
        raise InputError(f"{path}: cannot tell from its name which part it holds (name it with one of "
                         f"{', '.join(PARTS)})")
    return found[0]


def read_split_file(path: Path | str) -> pd.DataFrame:
    """A published split file's rows: `patient_id filename class source [...]`, space separated (COVIDx's format),
    with the part its name says."""
    path = Path(path)
    try:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the split file ({exc})") from exc
    short = next((i + 1 for i, cells in enumerate(lines) if len(cells) < 4), 0)
    if short:
        raise InputError(f"{path}:{short}: expected `patient_id filename class source`")
    df = pd.DataFrame([cells[:4] for cells in lines], columns=["patient_id", "filename", "class", "source"])
    return df.assign(part=split_file_part(path))


def listed_rows(df: pd.DataFrame, files: Sequence[Path | str]) -> pd.Series:
    """The part of each manifest row per the published split files (matched by file name), '' where none lists it."""
    listed = pd.concat([read_split_file(f) for f in files], ignore_index=True)
    twice = listed["filename"].duplicated(keep=False)
    if twice.any():
        raise InputError(f"split files list {listed.loc[twice, 'filename'].iloc[0]} more than once")
    part = df["path"].map(lambda p: Path(p).name).map(dict(zip(listed["filename"], listed["part"])))
    missing = len(listed) - int(part.notna().sum())
    if missing:
        log.info("%d image(s) named in the split files are not in the data folder (not ingested, or copies)", missing)
    return part.fillna("").rename("split")


def published_split(df: pd.DataFrame, files: Sequence[Path | str], val_fraction: float, seed: int) -> pd.Series:
    """train / val / test / unused per row from published split files; without a val file, `val_fraction` of the
    train file's patients become the validation part."""
    split = listed_rows(df, files).replace("", "unused")
    if not (split == "val").any():
        train = split == "train"
        split[train] = patient_split(df[train], (1 - val_fraction, val_fraction, 0.0), seed)
    used = split != "unused"
    assert_patient_disjoint(df.loc[used, "patient_id"], split[used])
    return split
