"""Preprocessing cache: every image decoded once, made square, resized and stored as uint8 in a memory-mapped array.

Training then reads raw uint8 tensors (no decoding, no per-epoch resizing), which is what lets the loop keep up with a
GPU and keeps data feeding cheap on a CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from covidcxr.config import SQUARE_CHOICES
from covidcxr.errors import InputError, MissingInputError

CACHE_FILE = "cache.u8"
CACHE_META = "cache.json"
MANIFEST_FILE = "manifest.parquet"


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] -> the nearest of the 256 gray levels, as floats 0..255 (what uint8 storage holds)."""
    return x.mul(255).round().clamp(0, 255)


def make_square(image: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, S, S). `pad` (the default) adds black bands around the shorter side: no lung tissue is
    cut off (a centre crop of a portrait film loses the costophrenic angles) and anatomy keeps its proportions;
    `crop` takes the centre square; `squash` leaves the image as it is for the resize to stretch."""
    h, w = image.shape[-2], image.shape[-1]
    if mode == "pad":
        if torch.jit.is_scripting():
            side = max(h, w)
        else:  # torch.export (the ONNX exporter) keeps H and W symbolic only through sym_max
            side = cast(int, torch.sym_max(h, w))  # a SymInt while exporting, typed int as torch types shapes
        top, left = (side - h) // 2, (side - w) // 2
        return F.pad(image, [left, side - w - left, top, side - h - top])
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return image[..., top:top + side, left:left + side]
    return image


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to size x size (a plain copy when already that size)."""
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_cache_levels(image: torch.Tensor, mode: str, size: int) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 1, size, size) gray levels: square, antialiased resize, rounded. This is the
    first step of `covidcxr.preprocess.transform.Preprocess`, and so of every exported graph."""
    return to_levels(resize(make_square(image, mode), size))


def to_square(img: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Gray float image (H, W) in [0, 1] -> (size, size) uint8: what the cache stores for it."""
    if mode not in SQUARE_CHOICES:
        raise InputError(f"unknown square mode {mode!r}; choose one of {', '.join(SQUARE_CHOICES)}")
    with torch.no_grad():
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
        return to_cache_levels(image, mode, size)[0, 0].to(torch.uint8).numpy()


class ImageCache:
    """The uint8 image array of a data folder plus its manifest; grows in place when ingest adds images."""

    def __init__(self, data_dir: str | Path, size: int | None = None, mode: Literal["r", "r+"] = "r",
                 square: str | None = None) -> None:
        """Open an ingested folder (`size`/`square` must then match it), or start a new cache when `size` is given."""
        self.dir = Path(data_dir)
        meta_path = self.dir / CACHE_META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            asked = {"size": size, "square": square}
            for key, value in asked.items():
                if value is not None and value != meta[key]:
                    raise InputError(f"{self.dir}: cache was built with {key}={meta[key]}, asked for {value}; "
                                     "use a new --out")
            self.size, self.capacity, self.square = int(meta["size"]), int(meta["capacity"]), meta["square"]
        elif size is None:
            raise MissingInputError(f"{self.dir}: not an ingested data folder (no {CACHE_META}); "
                                    "run covidcxr ingest first")
        else:
            self.size, self.capacity, self.square = size, 0, square or "pad"
        self.mode = mode
        self._array: np.memmap | None = None

    @property
    def array(self) -> np.ndarray:
        """The images, memory-mapped on first use, so opening a folder reads nothing until images are needed."""
        if self._array is None:
            if self.capacity == 0:
                return np.zeros((0, self.size, self.size), np.uint8)
            self._array = np.memmap(self.dir / CACHE_FILE, np.uint8, self.mode if self.mode == "r" else "r+",
                                    shape=(self.capacity, self.size, self.size))
        return self._array

    def reserve(self, capacity: int) -> None:
        """Grow the backing file (existing images stay where they are)."""
        if capacity <= self.capacity:
            return
        self.flush()
        self._array = None
        with open(self.dir / CACHE_FILE, "ab") as fh:
            fh.truncate(capacity * self.size * self.size)
        self.capacity = capacity
        self.write_meta()

    def write(self, index: int, image: np.ndarray) -> None:
        """Store one uint8 square at its cache row (ingest's workers decode; the parent writes)."""
        self.array[index] = image

    def flush(self) -> None:
        """Push written rows to disk, so a folder is consistent before its manifest names them."""
        if isinstance(self._array, np.memmap):
            self._array.flush()

    def write_meta(self) -> None:
        """Write cache.json atomically (temp file + rename): a crash never leaves a half-written description."""
        meta = {"size": self.size, "capacity": self.capacity, "square": self.square, "file": CACHE_FILE}
        tmp = self.dir / (CACHE_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(self.dir / CACHE_META)

    def manifest(self, include_duplicates: bool = False, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The manifest's kept images; copies stay listed (so re-ingest skips them) but are left out unless asked.
        `columns`: only these (with duplicate_of), e.g. training's, which leaves out the 1 KB thumbnail per image."""
        wanted = None if columns is None else list(dict.fromkeys([*columns, "duplicate_of"]))
        df = pd.read_parquet(self.dir / MANIFEST_FILE, columns=wanted)
        return df if include_duplicates else df[df["duplicate_of"] == ""].reset_index(drop=True)

    def load(self, indices: Sequence[int] | np.ndarray | pd.Series) -> torch.Tensor:
        """uint8 tensor (N, S, S) of the given cache rows, read into memory once (a training set fits in RAM)."""
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(indices, dtype=np.int64)]))

    def read(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """uint8 tensor (N, S, S) of the given cache rows, read from the file (in file order, returned in the order
        asked) rather than through the memory map: pages a map touches stay counted in the process's resident memory,
        so streaming an epoch of a large cache that way would grow it; reads leave them to the page cache."""
        rows = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(rows), self.size, self.size), np.uint8)
        side = self.size * self.size
        fd = os.open(self.dir / CACHE_FILE, os.O_RDONLY)
        try:
            for i in np.argsort(rows, kind="stable"):
                if os.preadv(fd, [out[i]], int(rows[i]) * side) != side:
                    raise InputError(f"{self.dir / CACHE_FILE}: row {rows[i]} lies beyond the end of the file")
        finally:
            os.close(fd)
        return torch.from_numpy(out)

