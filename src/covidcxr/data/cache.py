"""Preprocessing cache: every image decoded once, made square, resized and stored as uint8 in a memory-mapped array.

Training then reads raw uint8 tensors (no decoding, no per-epoch resizing), which is what lets the loop keep up with a
GPU and keeps data feeding cheap on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from covidcxr.config import SQUARE_CHOICES
from covidcxr.errors import InputError, MissingInputError

CACHE_FILE = "cache.u8"
CACHE_META = "cache.json"
MANIFEST_FILE = "manifest.parquet"
SQUARE_MODES = SQUARE_CHOICES


def to_square(img: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Gray float image in [0, 1] -> (size, size) uint8.

    `pad` (default) adds black borders around the shorter side: no lung tissue is cut off (a centre crop of a portrait
    film loses the costophrenic angles) and anatomy keeps its proportions. `squash` resizes without keeping the aspect
    ratio and `crop` takes the centre square; both are offered for the shortcut experiments, since the amount of
    padding differs between databases and can itself be learned.
    """
    if mode not in SQUARE_MODES:
        raise InputError(f"unknown square mode {mode!r}; choose one of {', '.join(SQUARE_MODES)}")
    pil = Image.fromarray(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), mode="L")
    w, h = pil.size
    if mode == "pad" and w != h:
        side = max(w, h)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(pil, ((side - w) // 2, (side - h) // 2))
        pil = canvas
    elif mode == "crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        pil = pil.crop((left, top, left + side, top + side))
    return np.asarray(pil.resize((size, size), Image.LANCZOS, reducing_gap=3.0))


class ImageCache:
    """The uint8 image array of a data folder plus its manifest; grows in place when ingest adds images."""

    def __init__(self, data_dir: str | Path, size: int | None = None, mode: str = "r", square: str | None = None):
        self.dir = Path(data_dir)
        meta_path = self.dir / CACHE_META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            asked = {"size": size, "square": square}
            for key, value in asked.items():
                if value is not None and value != meta[key]:
                    raise InputError(f"{self.dir}: cache was built with {key}={meta[key]}, asked for {value}; use a new --out")
            self.size, self.capacity, self.square = int(meta["size"]), int(meta["capacity"]), meta["square"]
        elif size is None:
            raise MissingInputError(f"{self.dir}: not an ingested data folder (no {CACHE_META}); run covidcxr ingest first")
        else:
            self.size, self.capacity, self.square = size, 0, square or "pad"
        self.mode = mode
        self._array: np.memmap | None = None

    @property
    def array(self) -> np.ndarray:
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
        self.array[index] = image

    def flush(self) -> None:
        if isinstance(self._array, np.memmap):
            self._array.flush()

    def write_meta(self) -> None:
        meta = {"size": self.size, "capacity": self.capacity, "square": self.square, "file": CACHE_FILE}
        tmp = self.dir / (CACHE_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(self.dir / CACHE_META)

    def manifest(self, include_duplicates: bool = False) -> pd.DataFrame:
        df = pd.read_parquet(self.dir / MANIFEST_FILE)
        return df if include_duplicates else df[df["duplicate_of"] == ""].reset_index(drop=True)

    def load(self, indices) -> torch.Tensor:
        """uint8 tensor (N, S, S) of the given cache rows, read into memory once (a training set fits in RAM)."""
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(indices, dtype=np.int64)]))


class CachedDataset(torch.utils.data.Dataset):
    """Map-style dataset over cached uint8 images: (uint8 tensor (S, S), class index); decodes nothing."""

    def __init__(self, cache: ImageCache, indices, targets):
        self.images = cache.load(indices)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]
