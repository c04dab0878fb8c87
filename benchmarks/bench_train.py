"""Training throughput: the model alone (fixed input on the device) vs the real loop (cache -> augment -> step).

    python benchmarks/bench_train.py DATA [--device auto] [--batch-size 64] [--image-size 224] [--steps 20]

Prints both figures side by side from one run on one device and the loop's share of the model-only ceiling
(targets in ../shared/DESIGN.md: >= 90 % on a GPU; data feeding < 10 % of the step on a CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from covidcxr.config import TrainConfig
from covidcxr.device import autocast, resolve_device
from covidcxr.model.network import build_model
from covidcxr.training.schedule import build_optimizer
from covidcxr.training.trainer import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(cfg: TrainConfig, device: torch.device, steps: int) -> float:
    """images/s of forward + backward + the trainer's own optimizer step (build_optimizer: param groups, fused) on
    one fixed batch already on the device: the ceiling the real loop is compared with."""
    model = build_model(cfg.arch, 2, "none").to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    opt = build_optimizer(model, cfg, cfg.weights)
    x = torch.rand(cfg.batch_size, 1, cfg.image_size, cfg.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (cfg.batch_size,), device=device)

    def step() -> None:
        with autocast(device, cfg.amp):
            loss = F.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def full_loop(cfg: TrainConfig, epochs: int) -> tuple[float, int]:
    """images/s of Trainer.train_epoch (indexing the uint8 cache, batched augmentation, step) after a warm-up epoch."""
    trainer = Trainer(cfg)
    trainer.train_epoch(0)  # warm-up (allocations, cudnn autotune, compile)
    sync(trainer.device)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        trainer.train_epoch(epoch)
    sync(trainer.device)
    images = trainer.steps_per_epoch * cfg.batch_size * epochs
    return images / (time.perf_counter() - start), images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="ingested data folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20, help="timed model-only steps")
    ap.add_argument("--epochs", type=int, default=1, help="timed full-loop epochs")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=args.data, out=tmp, weights="none", device=str(device.type),
                          batch_size=args.batch_size, image_size=args.image_size, epochs=args.epochs + 1,
                          compile=args.compile, task="covid-vs-rest")
        loop, n = full_loop(cfg, args.epochs)
        ceiling = model_only(replace(cfg, out=tmp), device, args.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {args.batch_size}; input {args.image_size}px; compile {args.compile}; "
          f"torch {torch.__version__}")
    print(f"model only : {ceiling:10,.0f} images/s")
    print(f"full loop  : {loop:10,.0f} images/s  ({n} images: cache -> augment -> step)")
    feeding = max(0.0, 1 - loop / ceiling)
    print(f"loop / model-only = {loop / ceiling:.1%}  (data feeding costs {feeding:.1%} of the step)")


if __name__ == "__main__":
    main()
