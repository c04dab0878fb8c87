"""The manifest's identity columns: content hashes, perceptual hashes, and duplicate detection across databases.

The same X-ray is often redistributed by several databases (resized, recompressed, renamed). Copies across a split
leak test images into training, so ingest keeps one copy of each and lists the rest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

MANIFEST_COLUMNS = [
    "path", "label", "source", "patient_id", "view", "finding", "age_group", "sex", "modality", "manufacturer",
    "date", "sha1", "phash", "thumb", "orig_height", "orig_width", "mtime", "size_bytes", "cache_index", "duplicate_of",
]


def content_hash(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def perceptual_hash(img: np.ndarray) -> str:
    """64-bit DCT hash of the image squeezed to 32x32 (aspect ignored, so square-resized copies still match)."""
    pil = Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), mode="L")
    return str(imagehash.phash(pil, hash_size=8))


THUMB = 32  # side of the aspect-ignoring thumbnail used to find near-duplicates


def thumbnail(img: np.ndarray) -> bytes:
    """32x32 uint8 thumbnail, aspect ratio ignored, so squashed or resized copies of an image still line up."""
    pil = Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), mode="L")
    return np.asarray(pil.resize((THUMB, THUMB), Image.Resampling.BOX)).tobytes()


def _unit_vectors(thumbs: pd.Series) -> np.ndarray:
    t = np.stack([np.frombuffer(b, np.uint8) for b in thumbs]).astype(np.float32)
    t -= t.mean(axis=1, keepdims=True)
    return t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-6)


def _candidate_pairs(vectors: np.ndarray, threshold: float, chunk: int = 512) -> list[list[tuple[int, float]]]:
    """For each row, the earlier rows whose thumbnail correlates >= threshold.

    Chunked matrix products: memory stays at chunk x N floats (about 230 MB for a 112,000-image NIH ingest).
    """
    pairs: list[list[tuple[int, float]]] = [[] for _ in range(len(vectors))]
    for lo in range(0, len(vectors), chunk):
        corr = vectors[lo:lo + chunk] @ vectors[: lo + chunk].T
        for r, c in zip(*np.nonzero(corr >= threshold)):
            if c < lo + r:
                pairs[lo + r].append((int(c), float(corr[r, c])))
    return pairs


def find_duplicates(df: pd.DataFrame, same_label: float = 0.95, other_label: float = 0.975) -> pd.DataFrame:
    """Mark copies: rows with the same file bytes, or whose thumbnail correlates with a kept row's.

    A correlation of `same_label` makes a copy; between images with different labels the bar is `other_label`, because
    chest X-rays of different people can look alike at 32x32 and such look-alikes are not copies (a true copy with a
    different label is a label conflict, flagged). Rows are visited in order (callers put the preferred database and
    the larger original first); an image is a copy when it matches an image already kept, and matching is deliberately
    not transitive, so chains of look-alike images do not merge. Returns one row per copy.
    """
    labels, paths, shas = df["label"].to_numpy(), df["path"].to_numpy(), df["sha1"].to_numpy()
    pairs = _candidate_pairs(_unit_vectors(df["thumb"]), min(same_label, other_label)) if len(df) else []
    kept = np.zeros(len(df), dtype=bool)
    by_sha: dict[str, int] = {}
    records = []
    for i in range(len(df)):
        match, corr = by_sha.get(shas[i]), 1.0
        if match is None:
            hits = [(c, j) for j, c in pairs[i]
                    if kept[j] and c >= (same_label if labels[j] == labels[i] else other_label)]
            if hits:
                corr, match = max(hits)
        if match is None:
            kept[i] = True
            by_sha[shas[i]] = i
            continue
        records.append({"path": paths[i], "duplicate_of": paths[match], "correlation": round(corr, 4),
                        "label": labels[i], "kept_label": labels[match],
                        "label_conflict": bool(labels[i] != labels[match])})
    return pd.DataFrame(records, columns=["path", "duplicate_of", "correlation", "label", "kept_label",
                                          "label_conflict"])


def manifest_hash(df: pd.DataFrame) -> str:
    """Identity of the data a run used: the images (by content) and their labels and patients."""
    key = df.sort_values("sha1")[["sha1", "label", "patient_id", "source"]].to_csv(index=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
