"""Streaming training: the cache file read batch by batch in the background gives the weights holding the images in
memory gives, and a streaming run checkpointed within an epoch resumes to the uninterrupted result."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from covidcxr.config import AugmentConfig, GateSettings, TrainConfig
from covidcxr.data.cache import ImageCache
from covidcxr.model.checkpoint import load_checkpoint
from covidcxr.preprocess.spec import PreprocessSpec
from covidcxr.preprocess.transform import Preprocess
from covidcxr.training import trainer as train_mod
from covidcxr.training.feed import PREFETCH, Images, in_memory


def test_reading_rows_from_the_file_equals_the_memory_map(tiny_data):
    cache = ImageCache(tiny_data)
    rows = np.random.default_rng(0).permutation(cache.capacity)[:40]
    rows[5] = rows[9]  # the same row twice
    assert torch.equal(cache.read(rows), cache.load(rows))


def test_streamed_batches_equal_the_held_ones(tiny_data):
    """Normalising batch by batch (equalization on) gives the bytes of normalising the whole part once."""
    cache = ImageCache(tiny_data)
    pre = Preprocess(PreprocessSpec(cache.square, cache.size, 64, AugmentConfig(equalize="global")))
    rows = np.arange(cache.capacity)[::-1].copy()
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))
    held, streamed = (Images(cache, rows, pre, torch.device("cpu"), hold) for hold in (True, False))
    a, b = list(held.batches(order, 16, 1, 6)), list(streamed.batches(order, 16, 1, 6))
    assert len(a) == len(b) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.cat(list(streamed.in_order(10))), held.held)


def test_a_loop_that_stops_early_stops_the_reader(tiny_data, monkeypatch):
    cache = ImageCache(tiny_data)
    reads = []
    real_read = cache.read
    monkeypatch.setattr(cache, "read", lambda rows: reads.append(len(rows)) or real_read(rows))
    pre = Preprocess(PreprocessSpec(cache.square, cache.size, 64, AugmentConfig()))
    streamed = Images(cache, np.arange(cache.capacity), pre, torch.device("cpu"), hold=False)
    before = threading.active_count()
    batches = streamed.batches(torch.arange(cache.capacity), 1, 0, cache.capacity)
    assert next(batches).shape == (1, cache.size, cache.size)
    batches.close()  # as when the loop breaks off: the reader ends without reading the rest of the epoch
    assert threading.active_count() == before and len(reads) <= 2 + PREFETCH < cache.capacity


def test_a_reader_error_reaches_the_loop(tiny_data, tmp_path):
    cache = ImageCache(tiny_data)
    pre = Preprocess(PreprocessSpec(cache.square, cache.size, 64, AugmentConfig()))
    beyond = Images(cache, np.array([0, cache.capacity + 5]), pre, torch.device("cpu"), hold=False)
    with pytest.raises(ValueError, match="beyond the end"):
        list(beyond.in_order(2))


def test_auto_holds_small_data_and_streams_large(tiny_data):
    cpu = torch.device("cpu")
    assert in_memory("auto", 96, 64, cpu) and not in_memory("stream", 96, 64, cpu)
    assert not in_memory("auto", 400_000_000, 256, cpu) and in_memory("memory", 400_000_000, 256, cpu)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(data), "--out", str(out), "--weights", "none", "--image-size", "64", "--epochs", "2",
            "--batch-size", "32", "--device", "cpu", "--seed", "5", "--deterministic", "--keep-last", "--no-gate",
            *extra]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_stream_and_memory_train_to_the_same_model(tiny_data, tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    for flag in ("--stream", "--data-in-memory"):
        run_cli(*_args(tiny_data, tmp_path / flag, flag), env=env).check_returncode()
    stream, memory = tmp_path / "--stream", tmp_path / "--data-in-memory"
    assert json.loads((stream / "config.json").read_text())["data_path_used"] == "stream"
    assert json.loads((memory / "config.json").read_text())["data_path"] == "memory"
    assert _same_weights(stream / "last.pt", memory / "last.pt") and _same_weights(stream / "model.pt",
                                                                                  memory / "model.pt")
    assert (stream / "val_predictions.csv").read_text() == (memory / "val_predictions.csv").read_text()


def _cfg(data: Path, out: Path) -> TrainConfig:
    # 5 steps an epoch, checkpointed after the third: a resume within an epoch streams its last two (the short one)
    return TrainConfig(data=str(data), out=str(out), weights="none", image_size=64, epochs=2, batch_size=16,
                       device="cpu", seed=2, deterministic=True, amp=False, data_path="stream", checkpoint_steps=3,
                       gate=GateSettings(enabled=False))  # the weights are what is compared


@pytest.mark.slow
def test_a_streaming_run_resumes_within_an_epoch(tiny_data, tmp_path, monkeypatch):
    full = train_mod.train(_cfg(tiny_data, tmp_path / "full"), keep_last=True)
    original = train_mod.Trainer._checkpoint_within
    taken = []

    def crash_after_a_checkpoint_in_the_second_epoch(self, epoch, progress, gen):
        original(self, epoch, progress, gen)
        taken.append((epoch, progress["step"]))
        if epoch == 1 and progress["step"] == 3:
            raise KeyboardInterrupt  # as if the machine went down mid-epoch

    monkeypatch.setattr(train_mod.Trainer, "_checkpoint_within", crash_after_a_checkpoint_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(_cfg(tiny_data, tmp_path / "cut"))
    monkeypatch.setattr(train_mod.Trainer, "_checkpoint_within", original)
    assert taken[-1] == (1, 3) and (0, 3) in taken
    last = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert last["epoch"] == 0 and last["within_epoch"]["step"] == 3
    resumed = train_mod.train(replace(_cfg(tiny_data, tmp_path / "cut")), resume=True, keep_last=True)
    assert _same_weights(full / "last.pt", resumed / "last.pt") and _same_weights(full / "model.pt",
                                                                                 resumed / "model.pt")
    history = [(tmp_path / run / "history.csv").read_text().splitlines() for run in ("full", "cut")]
    assert [line.split(",")[:4] for line in history[0]] == [line.split(",")[:4] for line in history[1]]
