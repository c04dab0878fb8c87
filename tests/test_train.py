"""Training loop: run files, resume equals an uninterrupted run, DDP with gloo, fine-tuning from a weights file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CLI_TIMEOUT_S, cli_env, run_cli, start_cli
from covidcxr.config import GateSettings, TrainConfig
from covidcxr.data.splits import assert_patient_disjoint
from covidcxr.model.checkpoint import load_checkpoint
from covidcxr.training import trainer as train_mod
from covidcxr.training.distributed import Dist, weights_digest
from covidcxr.training.rundata import load_data
from covidcxr.training.schedule import epoch_order


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(data=str(data), out=str(out), weights="none", image_size=64, epochs=3, batch_size=16, lr=0.01,
                       device="cpu", seed=3, deterministic=True, patience=10, amp=False,
                       gate=GateSettings(enabled=False))
    return replace(base, **kw)


@pytest.mark.slow
def test_train_writes_run_files(tiny_data, tmp_path):
    run = train_mod.train(_cfg(tiny_data, tmp_path / "run", epochs=2))
    for name in ("config.json", "model.pt", "last.pt", "history.csv", "split.csv", "val_predictions.csv"):
        assert (run / name).exists(), name
    hist = pd.read_csv(run / "history.csv")
    assert list(hist.columns[:6]) == ["epoch", "train_loss", "val_loss", "val_auc", "lr", "images_per_s"]
    assert hist["epoch"].tolist() == [0, 1] and hist["val_auc"].between(0, 1).all()
    split = pd.read_csv(run / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert_patient_disjoint(split["patient_id"], split["split"])
    meta = load_checkpoint(run / "model.pt")["meta"]
    assert 0 <= meta["threshold"] <= 1 and meta["classes"] == ["normal", "covid"]
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 3 and len(config["manifest_hash"]) == 16
    with pytest.raises(FileExistsError):  # never overwrite a finished run silently
        train_mod.Trainer(_cfg(tiny_data, tmp_path / "run", epochs=2))


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    def cfg(out: Path) -> TrainConfig:  # 2 epochs of 3 steps: an AlexNet step costs about the same at 16 images as 32
        return _cfg(tiny_data, out, epochs=2, batch_size=32)

    full = train_mod.train(cfg(tmp_path / "full"), keep_last=True)  # the final weights, to compare
    original = train_mod.Trainer._end_epoch

    def crash_after_first_epoch(self, epoch, *args):
        stop = original(self, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during epoch 2
        return stop

    monkeypatch.setattr(train_mod.Trainer, "_end_epoch", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg(tmp_path / "resumed"))
    monkeypatch.setattr(train_mod.Trainer, "_end_epoch", original)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 0
    resumed = train_mod.train(cfg(tmp_path / "resumed"), resume=True, keep_last=True)
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(resumed / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert pd.read_csv(resumed / "history.csv")["epoch"].tolist() == [0, 1]


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    # batches of 16: an AlexNet step costs about the same at 4 images as at 16 (its optimizer step over 57 M weights)
    return ["train", "--no-gate", str(data), "--out", str(out), "--weights", "none", "--image-size", "64",
            "--epochs", "3", "--batch-size", "16", "--lr", "0.01", "--device", "cpu", "--seed", "3", "--deterministic",
            "--keep-last", *extra]


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def _saved_epoch(path: Path) -> int | None:
    """The epoch of a checkpoint (None while there is none), read without loading its weights: polled while a run
    writes it."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"] if path.exists() else None


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_data, tmp_path):
    """SIGKILL a training process during its second epoch, resume it for the remaining two: model.pt, last.pt, the
    threshold and history.csv (but its timings) equal those of a run never interrupted."""
    env = {"OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    run_cli(*_train_args(tiny_data, full), env=env).check_returncode()
    killed = tmp_path / "killed"
    proc = start_cli(*_train_args(tiny_data, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _saved_epoch(killed / "last.pt") is None:  # the first epoch's checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2, whose 5 steps take about 3 s
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert load_checkpoint(killed / "last.pt")["epoch"] in (0, 1)
    run_cli(*_train_args(tiny_data, killed, "--resume"), env=env).check_returncode()
    for name in ("model.pt", "last.pt"):
        a, b = _weights(full / name), _weights(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    meta_a, meta_b = load_checkpoint(full / "model.pt")["meta"], load_checkpoint(killed / "model.pt")["meta"]
    assert meta_a["threshold"] == meta_b["threshold"] and meta_a["epoch"] == meta_b["epoch"]
    timing = ["images_per_s", "seconds"]
    pd.testing.assert_frame_equal(pd.read_csv(full / "history.csv").drop(columns=timing),
                                  pd.read_csv(killed / "history.csv").drop(columns=timing))


@pytest.mark.slow
def test_resume_refuses_changed_settings(tiny_data, tmp_path):
    train_mod.train(_cfg(tiny_data, tmp_path / "run", epochs=1))
    with pytest.raises(ValueError, match="settings differ"):
        train_mod.train(_cfg(tiny_data, tmp_path / "run", epochs=1, lr=0.5), resume=True)


@pytest.mark.slow
def test_holdout_sources_become_the_test_part(tiny_data, tmp_path):
    run = train_mod.train(_cfg(tiny_data, tmp_path / "run", epochs=1, holdout_sources=["b"]))
    split = pd.read_csv(run / "split.csv")
    assert (split.loc[split["source"] == "b", "split"] == "test").all()
    assert (split.loc[split["source"] == "a", "split"] != "test").all()


@pytest.mark.slow
def test_finetunes_from_torchvision_weights_file(tiny_data, tmp_path):
    import torchvision
    torch.manual_seed(1)
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet-owt-test.pth"
    torch.save(state, path)
    run = train_mod.train(_cfg(tiny_data, tmp_path / "run", epochs=1, weights=str(path), lr=0.001))
    tuned = load_checkpoint(run / "model.pt")["model"]
    key = next(k for k in tuned if k.endswith("features.3.weight"))  # second conv: copied, then fine-tuned
    corr = np.corrcoef(tuned[key].flatten().numpy(), state["features.3.weight"].flatten().numpy())[0, 1]
    assert corr > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("data_path", [["--data-in-memory"], ["--stream", "--checkpoint-steps", "2"]])
def test_ddp_two_processes_gloo(tiny_data, tmp_path, data_path):
    """torchrun with two CPU processes (gloo): one run folder, written by rank 0, with both ranks in step, whether
    each rank holds the images or streams its shard of every epoch (checkpointing within epochs: a collective)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "covidcxr.cli", "train", "--no-gate", str(tiny_data), "--out", str(out), "--weights", "none",
           "--image-size", "64", "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--seed", "1", *data_path]
    env = cli_env({"OMP_NUM_THREADS": "1"})
    result = subprocess.run([*cmd, "--keep-last"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    hist = pd.read_csv(out / "history.csv")
    assert hist["epoch"].tolist() == [0, 1]  # one writer: no duplicated rows from rank 1
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1
    ranks = json.loads((out / "ddp.json").read_text())
    assert ranks["world"] == 2 and ranks["ranks_agree"] is True  # both ranks ended with identical weights...
    model = train_mod.build_model("alexnet", 2, "none")
    model.load_state_dict(last["model"])
    assert ranks["weights_sha256"] == [weights_digest(model)] * 2  # ...which are the saved ones


def test_source_class_balance_draws_every_group_equally(tiny_data):
    cfg = _cfg(tiny_data, Path("unused"), balance="source-class")
    _, df = load_data(cfg)
    train = df[df["split"] == "train"].reset_index(drop=True)
    drawn = torch.cat([epoch_order(train, cfg, epoch, Dist()) for epoch in range(20)])
    groups = train.loc[drawn.numpy(), ["source", "y"]].value_counts(normalize=True)
    assert len(groups) == 4 and np.allclose(groups.to_numpy(), 0.25, atol=0.03)  # raw shares are about 1/3 : 2/3
    assert not np.allclose(train[["source", "y"]].value_counts(normalize=True).to_numpy(), 0.25, atol=0.03)


@pytest.mark.slow
def test_domain_adversarial_run_trains_and_saves_its_source_head(tiny_data, tmp_path):
    run = train_mod.train(_cfg(tiny_data, tmp_path / "run", epochs=1, domain_adversarial=0.3))
    ckpt = load_checkpoint(run / "model.pt")
    assert ckpt["meta"]["num_sources"] == 2
    assert any(k.startswith("source_head.") for k in ckpt["model"])


def test_target_sensitivity_flag_sets_the_threshold_method(tiny_data, tmp_path):
    from covidcxr.cli import build_parser
    from covidcxr.cli.train import train_config
    args = build_parser().parse_args(["train", str(tiny_data), "--out", str(tmp_path / "r"),
                                      "--target-sensitivity", "0.9"])
    cfg = train_config(args)
    assert cfg.threshold_method == "sensitivity" and cfg.target_sensitivity == 0.9


def test_preprocessing_flags_override_the_yaml_and_keep_its_other_augment_settings(tiny_data, tmp_path):
    from covidcxr.cli import build_parser
    from covidcxr.cli.train import train_config
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("augment: {equalize: none, jpeg: 0.5}\n")
    args = build_parser().parse_args(["train", str(tiny_data), "--out", str(tmp_path / "r"), "--config", str(yaml_file),
                                      "--crop", "border", "--equalize", "clahe"])
    augment = train_config(args).augment
    assert (augment.crop, augment.equalize, augment.jpeg) == ("border", "clahe", 0.5)
    plain = train_config(build_parser().parse_args(["train", str(tiny_data), "--out", str(tmp_path / "r")])).augment
    assert (plain.crop, plain.equalize) == ("none", "global")
