"""Lean run folders: a finished run keeps no optimizer state (unless --keep-last) and `--resume` has nothing to do."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from covidcxr.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # `covidcxr train` in a subprocess


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--no-gate", str(data), "--out", str(out), "--weights", "none", "--image-size", "64",
                   "--epochs", "1",
                   "--batch-size", "16", "--device", "cpu", "--seed", "0", *extra)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_finished_run_holds_no_optimizer_state_and_resume_has_nothing_to_do(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert _train(tiny_data, run).returncode == 0
    last = load_checkpoint(run / "last.pt")
    assert last["finished"] and last["model"] == {} and "optimizer" not in last
    assert _folder_bytes(run) <= 300e6 and _folder_bytes(run) < 1.2 * (run / "model.pt").stat().st_size
    before = (run / "model.pt").read_bytes()

    resumed = _train(tiny_data, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [line] = [ln for ln in resumed.stderr.splitlines() if "nothing to resume" in ln]
    assert line == f"{run}: finished after epoch 1; nothing to resume"
    assert (run / "model.pt").read_bytes() == before


def test_keep_last_keeps_the_optimizer_state(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert _train(tiny_data, run, "--keep-last").returncode == 0
    last = load_checkpoint(run / "last.pt")
    assert last["finished"] and "optimizer" in last and last["optimizer"]["state"]
    model = load_checkpoint(run / "model.pt")["model"]
    assert last["model"].keys() == model.keys() and all(isinstance(v, torch.Tensor) for v in last["model"].values())
