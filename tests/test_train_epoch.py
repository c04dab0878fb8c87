"""Small training sets keep their images: every epoch trains on the last partial batch too (dropping it cost a set of
185 images with batch 64 almost a third of them), except a batch of one image for BatchNorm models."""

from __future__ import annotations

import pytest
import torch

from covidcxr.config import TrainConfig
from covidcxr.model.network import build_model
from covidcxr.training.distributed import Dist
from covidcxr.training.schedule import batches_per_epoch, build_optimizer, epoch_order
from covidcxr.training.trainer import Trainer


@pytest.mark.parametrize("n, batch, world, batchnorm, batches", [
    (185, 64, 1, False, 3),  # the measured case: 57 images were dropped every epoch, now none
    (128, 64, 1, False, 2),
    (129, 64, 1, False, 3),  # a last batch of one image is fine without BatchNorm
    (129, 64, 1, True, 2),  # ... and dropped with it (BatchNorm cannot train on one image)
    (185, 64, 2, False, 2),  # 93 per rank: 64 + 29
    (10, 64, 1, False, 1),
])
def test_the_last_partial_batch_is_kept(n, batch, world, batchnorm, batches):
    assert batches_per_epoch(n, batch, world, batchnorm) == batches


@pytest.mark.parametrize(("weights", "optimizer", "kind", "lrs"), [
    ("none", "auto", torch.optim.AdamW, (3e-4, 3e-4)),  # from scratch: every layer at AdamW's rate
    ("imagenet", "auto", torch.optim.SGD, (1e-3, 1e-2)),  # fine-tuning: the pretrained backbone at a tenth
    ("none", "sgd", torch.optim.SGD, (1e-2, 1e-2)),
    ("imagenet", "adamw", torch.optim.AdamW, (3e-5, 3e-4)),
])
def test_the_optimizer_follows_the_weights(weights, optimizer, kind, lrs):
    """auto: SGD to fine-tune pretrained weights (the paper's recipe), AdamW from scratch; either can be chosen."""
    model = build_model("alexnet", 2, "none")
    built = build_optimizer(model, TrainConfig(optimizer=optimizer), weights)
    assert type(built) is kind
    assert tuple(g["lr"] for g in built.param_groups) == pytest.approx(lrs)


def test_a_batchnorm_model_cannot_train_on_one_image():
    """Why the rule above drops a batch of one for BatchNorm archs: training on it fails."""
    model = build_model("resnet18", 2, "none").train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.rand(1, 1, 32, 32))
    model(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("balance", ["class", "source-class"])
def test_an_epoch_trains_on_every_image(tiny_data, tmp_path, balance):
    trainer = Trainer(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), weights="none", image_size=64,
                                  epochs=1, batch_size=48, device="cpu", amp=False, balance=balance))
    n = len(trainer.train_df)
    assert n % 48 > 1  # a partial last batch exists
    order = epoch_order(trainer.train_df, trainer.cfg, 0, Dist())
    assert len(order) == n and trainer.steps_per_epoch * 48 >= n > (trainer.steps_per_epoch - 1) * 48
    if balance == "class":
        assert sorted(order.tolist()) == list(range(n))  # each image once
