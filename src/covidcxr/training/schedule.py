"""What each step of a run sees and how fast it learns: seeding, each epoch's image order, batches per epoch, loss
weights and the learning-rate schedule.

Each is a function of the settings, the seed and the epoch only, never of how far a process got: that is what makes a
run resumed from its last checkpoint end with the same weights as an uninterrupted one, on every rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from covidcxr.config import AUTO, TrainConfig
from covidcxr.model.network import parameter_groups
from covidcxr.training.distributed import Dist


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch and numpy; with `deterministic`, also ask for bit-reproducible kernels (slower on GPUs)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency loss weights (mean 1): every class counts the same however rare it is."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = counts.sum() / np.maximum(counts, 1) / num_classes
    return torch.tensor(w, dtype=torch.float32)


def epoch_order(train: pd.DataFrame, cfg: TrainConfig, epoch: int, d: Dist) -> torch.Tensor:
    """This rank's image order for one epoch, a function of (seed, epoch) only."""
    if cfg.balance == "source-class":  # every (source, class) group drawn equally often
        groups = train.groupby(["source", "y"])["y"].transform("size").to_numpy()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        per_rank = math.ceil(len(train) / d.world)
        drawn = torch.multinomial(torch.tensor(1.0 / groups), per_rank * d.world, replacement=True, generator=gen)
        return drawn[d.rank * per_rank:(d.rank + 1) * per_rank]
    indices = cast(Dataset[int], range(len(train)))  # a sampler only takes len() of its data set
    sampler: DistributedSampler[int] = DistributedSampler(indices, d.world, d.rank, shuffle=True,
                                                          seed=cfg.seed)  # pads, drops none
    sampler.set_epoch(epoch)
    return torch.tensor(list(iter(sampler)))


def batches_per_epoch(n_images: int, batch_size: int, world: int, batchnorm: bool) -> int:
    """One rank's batches per epoch, the last partial one included (dropping it cost small sets up to a third of
    their images every epoch); only a last batch of one image is dropped for BatchNorm models, which cannot train
    on it."""
    full, rest = divmod(math.ceil(n_images / world), batch_size)
    return max(1, full + int(rest > 1 or (rest == 1 and not batchnorm)))


def resolve_optimizer(optimizer: str, weights: str) -> str:
    """'auto' -> SGD when fine-tuning pretrained weights (the paper's recipe), AdamW when training from scratch."""
    if optimizer != AUTO:
        return optimizer
    return "adamw" if weights == "none" else "sgd"


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, weights: str) -> torch.optim.Optimizer:
    """The run's optimizer over parameter_groups: pretrained layers at lr * backbone_lr_scale (every layer at lr when
    nothing is pretrained). Fused: one kernel per step instead of one per tensor, a quarter of the time on a CPU for
    AlexNet's 57 M weights (0.10 -> 0.03 s a step on 2 cores), where the step is a third of a batch's cost."""
    scale = 1.0 if weights == "none" else cfg.backbone_lr_scale  # nothing pretrained to protect
    if resolve_optimizer(cfg.optimizer, weights) == "adamw":
        return torch.optim.AdamW(parameter_groups(model, cfg.adamw_lr, scale), weight_decay=cfg.adamw_weight_decay,
                                 fused=True)
    return torch.optim.SGD(parameter_groups(model, cfg.lr, scale), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, fused=True)


def lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero: the new head starts gently on pretrained features."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return f
