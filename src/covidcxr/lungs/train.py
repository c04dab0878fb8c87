"""Training a LungUNet on (image, hand-drawn mask) pairs: held-out patients for validation, augmentation, and
the epoch with the best validation Dice saved as the lung model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from covidcxr.data.reader import read_image
from covidcxr.errors import InputError
from covidcxr.lungs.unet import CHANNELS, LungUNet, resize

LR = 3e-3


def _load_pairs(pairs: pd.DataFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, size, size) float in [0, 1] and masks (N, 1, size, size) float 0/1, both squashed."""
    images, masks = [], []
    for image, mask in tqdm(zip(pairs["image"], pairs["mask"]), total=len(pairs), desc="read", unit="img",
                            disable=len(pairs) < 50):
        img = torch.from_numpy(read_image(image))[None, None]
        drawn = torch.from_numpy(np.asarray(Image.open(mask).convert("L"), np.float32) / 255.0)[None, None]
        if drawn.shape != img.shape:  # the image may be a shrunk copy; the mask keeps the original size
            aspect = (img.shape[-1] / img.shape[-2], drawn.shape[-1] / drawn.shape[-2])
            if abs(aspect[0] - aspect[1]) > 0.02 * aspect[1]:
                raise InputError(f"{image} ({img.shape[-1]}x{img.shape[-2]}) and its mask {mask} "
                                 f"({drawn.shape[-1]}x{drawn.shape[-2]}) differ in aspect ratio")
        images.append(resize(img, size))
        masks.append((resize(drawn, size) > 0.5).float())
    return torch.cat(images), torch.cat(masks)


def _split(pairs: pd.DataFrame, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean 'is validation' per row; whole patients go to one side when patient_id is known, so that no film
    of a validation patient was seen in training."""
    groups = pairs["patient_id"].where(pairs["patient_id"] != "", pairs["image"]) if "patient_id" in pairs \
        else pairs["image"]
    unique = np.array(sorted(set(groups)))
    if len(unique) < 2:
        raise InputError(f"need images of at least 2 patients to hold some out for validation, got {len(unique)}")
    shuffled = np.random.default_rng(seed).permutation(unique)
    n_val = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    return groups.isin(shuffled[:n_val]).to_numpy(copy=True)


def _augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random rotation, scale and shift (films are not all framed alike) and a random gamma (the exposure
    curve differs by scanner; brightness and contrast need no augmenting, the model standardises them away).
    No horizontal flips: every film is seen from the front with the heart on the image's right, and the two lungs
    differ in shape, so a mirrored film is one the model would never meet."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * 2 * np.deg2rad(8)
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.6)
    x = F.grid_sample(x, grid, align_corners=False).clamp(0, 1) ** gamma
    y = (F.grid_sample(y, grid, align_corners=False) > 0.5).float()
    return x, y


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE for every pixel plus soft Dice per image (so the small lungs of a tightly framed film count too)."""
    p = torch.sigmoid(logits)
    inter = (p * y).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + (1 - dice).mean()


def _dice(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dice of boolean predictions (B, 1, H, W) per image; 1 when both are empty."""
    pred, y = pred.float(), y.float()
    inter = (pred * y).sum(dim=(1, 2, 3))
    return (2 * inter + 1e-6) / (pred.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3)) + 1e-6)


@torch.no_grad()
def _val_dice(model: LungUNet, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Mean per-image Dice on the held-out films, in batches: what picks the epoch that is kept."""
    model.eval()
    dice = torch.cat([_dice(model(x[i: i + batch_size]) > 0, y[i: i + batch_size])
                      for i in range(0, len(x), batch_size)])
    return float(dice.mean())


def train_lung_model(pairs: pd.DataFrame, out: Path, size: int = 128, epochs: int = 30, batch_size: int = 16,
                     seed: int = 0, val_fraction: float = 0.15) -> dict[str, Any]:
    """Train a LungUNet on (image, mask) pairs at size x size, keep the epoch with the best validation Dice, and
    save it to `out` (a torch checkpoint: state_dict, config, metrics, val_set) with the config and metrics also
    in out.with_suffix('.json'). Returns {"config": ..., "metrics": ...}; val_dice is the mean per-image Dice of
    the held-out films at size x size."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    is_val = _split(pairs, val_fraction, seed)
    x, y = _load_pairs(pairs, size)
    x_train, y_train, x_val, y_val = x[~is_val], y[~is_val], x[is_val], y[is_val]
    model = LungUNet(CHANNELS, size)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    steps = epochs * -(-len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=max(1, steps))
    best, best_epoch, best_state = -1.0, 0, model.state_dict()
    bar = tqdm(range(epochs), desc="lung model", unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            xb, yb = _augment(x_train[idx], y_train[idx], gen)
            loss = _loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        dice = _val_dice(model, x_val, y_val, batch_size)
        if dice > best:
            best, best_epoch = dice, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{loss.item():.3f}", val_dice=f"{dice:.3f}", best=f"{best:.3f}")
    config = {"size": size, "channels": list(CHANNELS), "epochs": epochs, "batch_size": batch_size, "seed": seed,
              "val_fraction": val_fraction, "lr": LR}
    metrics = {"val_dice": best, "best_epoch": best_epoch, "train_images": len(x_train),
               "val_images": len(x_val), "seconds": round(time.perf_counter() - started, 1)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"state_dict": best_state, "config": config, "metrics": metrics,
                "val_set": list(pairs["image"][is_val])}, tmp)
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps({"config": config, "metrics": metrics}, indent=2) + "\n")
    return {"config": config, "metrics": metrics}
