"""Where the loop's images come from: held in memory (small data, the fastest), or streamed from the cache file.

Both give the loop the same thing, batches of normalised uint8 squares in the order it asks for: `Preprocess.normalise`
works image by image, so normalising a batch gives the bytes that normalising the whole set once gives, and a run
trains to the same weights on either path. In memory, the split is read and normalised once and kept on the device
(every DDP rank holds all of it: ~2-3x the cache's bytes at its peak). Streamed, a background thread reads the rows
of the next batches from the cache file, normalises them and puts them on the device while the current step runs;
a rank reads only the rows of its own shard of the epoch, so its memory no longer grows with the data.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from covidcxr.config import AUTO
from covidcxr.data.cache import ImageCache
from covidcxr.preprocess.transform import Preprocess

log = logging.getLogger(__name__)

PREFETCH = 4  # batches the reader keeps ready ahead of the step
PEAK_FACTOR = 3  # the in-memory path's peak: the rows read, their normalised copy, the mapped file's pages
MEMORY_SHARE = 0.5  # auto keeps the data in memory while its peak on every rank of a node fits this share of RAM
DEVICE_SHARE = 0.25  # ... and, on a GPU, the normalised training set fits this share of the device's memory


def in_memory(setting: str, n_images: int, side: int, device: torch.device) -> bool:
    """Whether the run holds its images in memory: `memory` / `stream` as set; `auto` by size, in memory while the
    path's peak fits the machine (with room for the model) and the images fit the GPU."""
    if setting != AUTO:
        return setting == "memory"
    data = n_images * side * side
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = PEAK_FACTOR * data * ranks <= MEMORY_SHARE * ram
    if device.type == "cuda":
        fits = fits and data <= DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory
    return fits


class Images:
    """The normalised images of one part of a split (rows of the cache), served batch by batch."""

    def __init__(self, cache: ImageCache, rows: np.ndarray, preprocess: Preprocess, device: torch.device,
                 hold: bool) -> None:
        """`hold`: read and normalise them all now and keep them on `device`; else read each batch when asked."""
        self.cache, self.rows, self.preprocess, self.device = cache, np.asarray(rows, np.int64), preprocess, device
        self.held = preprocess.normalise_u8(cache.load(self.rows).to(device)) if hold else None

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, order: torch.Tensor, batch_size: int, start: int, stop: int) -> Iterator[torch.Tensor]:
        """Batches `start` .. `stop` - 1 of `order` (positions in this part), each (B, S, S) uint8 on the device."""
        if self.held is not None:
            held = self.held
            order = order.to(held.device)
            return (held[order[s * batch_size:(s + 1) * batch_size]] for s in range(start, stop))
        return self._stream(order.cpu(), batch_size, start, stop)

    def in_order(self, batch_size: int) -> Iterator[torch.Tensor]:
        """All of them in their own order (validation), `batch_size` at a time."""
        return self.batches(torch.arange(len(self)), batch_size, 0, math.ceil(len(self) / batch_size))

    def _read(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the cache file at these positions, normalised on the device."""
        images = self.cache.read(self.rows[positions.numpy()])
        if self.device.type == "cuda":
            images = images.pin_memory()
        return self.preprocess.normalise_u8(images.to(self.device, non_blocking=True))

    def _stream(self, order: torch.Tensor, batch_size: int, start: int, stop: int) -> Iterator[torch.Tensor]:
        """The batches from a background reader that stays up to PREFETCH batches ahead; its errors are raised here,
        and it stops when the loop stops asking."""
        ready: queue.Queue[torch.Tensor | BaseException | None] = queue.Queue(PREFETCH)
        done = threading.Event()

        def put(item: torch.Tensor | BaseException | None) -> None:
            while not done.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def reader() -> None:
            try:
                for s in range(start, stop):
                    if done.is_set():  # the loop stopped asking (early stop, an error, an interrupt)
                        return
                    put(self._read(order[s * batch_size:(s + 1) * batch_size]))
                put(None)
            except BaseException as exc:  # handed to the loop, which raises it
                put(exc)

        thread = threading.Thread(target=reader, name="covidcxr-reader", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            done.set()
            thread.join()
