"""Micro-batching for the service: images of concurrent requests share one forward pass; Grad-CAM runs alone.

A forward pass of 8 images costs far less than 8 passes of one on a CPU, so requests that arrive while the model is
busy (or within `max_wait_ms` of the first) are scored together and each answered on its own. All use of the model
runs on one dedicated thread, in order: batches never overlap, and a Grad-CAM request, which needs gradients and
hooks on the model, never sees another request's activations.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import numpy as np

from covidcxr.config import MAX_BATCH, MAX_WAIT_MS

if TYPE_CHECKING:  # torch's Predictor or the engine's EnginePredictor: the same interface
    from covidcxr.deploy.engine import EnginePredictor
    from covidcxr.deploy.predict import Predictor


@dataclass
class BatchStats:
    """How many images went through how many forward passes (a pass per image means no batching happened)."""

    images: int = 0
    passes: int = 0


class Batcher:
    """Queue of cache squares, scored in batches of up to `max_batch`; start() and stop() inside the event loop."""

    def __init__(self, predictor: Predictor | EnginePredictor, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS) -> None:
        """Nothing runs until start(): the queue and the model's thread belong to the server's event loop."""
        self.predictor, self.max_batch, self.max_wait_s = predictor, max_batch, max_wait_ms / 1000
        self.stats = BatchStats()
        self._model_thread: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the model's thread and the batching task (in the event loop that will call score())."""
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="covidcxr-model")
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop batching and let the model's thread finish what it runs, so the process exits cleanly."""
        assert self._worker is not None and self._model_thread is not None  # set by start()
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        self._model_thread.shutdown(wait=True)

    async def score(self, square: np.ndarray) -> float:
        """The probability of the positive class for one cache square, scored in a batch with whatever else is
        waiting."""
        future = asyncio.get_running_loop().create_future()
        assert self._queue is not None  # set by start()
        await self._queue.put((square, future))
        return await future

    async def explain(self, square: np.ndarray) -> tuple[float, bytes]:
        """(probability, Grad-CAM overlay PNG), on the model thread between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self.predictor.explain, square)

    async def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """The first waiting request, plus those that arrive within max_wait of it, up to max_batch."""
        assert self._queue is not None  # set by start(), which starts the task that calls this
        batch = [await self._queue.get()]
        with anyio.move_on_after(self.max_wait_s):  # cancels only at an await: no item is ever lost
            while len(batch) < self.max_batch:
                batch.append(await self._queue.get())
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self) -> None:
        """Score batch after batch, forever; a failed batch fails its own requests only."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            squares = np.stack([square for square, _ in batch])
            try:
                scores = await loop.run_in_executor(self._model_thread, self.predictor.scorer.scores, squares)
            except Exception as exc:  # noqa: BLE001 - a failed pass is every waiting request's error, not the worker's
                outcomes: list[Exception | float] = [exc] * len(batch)
            else:
                outcomes = [float(p) for p in scores]
                self.stats.images += len(batch)
                self.stats.passes += 1
            for (_, future), outcome in zip(batch, outcomes):
                if future.done():  # the client went away
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
