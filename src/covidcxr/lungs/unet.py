"""A small learned lung segmentation: a tiny U-Net trained on public hand-drawn lung masks.

The heuristic in `lungs` needs no weights but is coarse (Dice 0.75 against drawn lungs); a learned mask lets
training crop each film to its lungs and lets the shortcut diagnostics blank or keep the lungs more exactly.

The masks are the hand-drawn lung masks (V7 Labs annotations of images of the Cohen COVID-19 collection) that
torchxrayvision ships inside its wheel as data/semantic_masks_v7labs_lungs.zip. The wheel is fetched with pip, so
the package index the user has configured (or a local folder) is used, and nothing of it is installed. Each mask
is a binary 0/255 gray image of the same size as the original X-ray, named like the original file.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from covidcxr.errors import InputError, MissingInputError
from covidcxr.lungs.boxes import mask_boxes
from covidcxr.data.download import DownloadError
from covidcxr.data.reader import read_image

WHEEL = "torchxrayvision==1.5.7"
MASKS_ZIP = "torchxrayvision/data/semantic_masks_v7labs_lungs.zip"
MASK_FOLDER = "semantic_masks_v7labs_lungs"  # the folder inside MASKS_ZIP, and the one made under dest
CHANNELS = (8, 16, 32, 64)
LR = 3e-3
MIN_LUNG_AREA = 0.02  # a mask smaller than this share of the image counts as no lungs found


def fetch_masks(dest: Path, find_links: str | None = None) -> Path:
    """Extract the hand-drawn lung masks from torchxrayvision's wheel into dest/semantic_masks_v7labs_lungs/ and
    return that folder; skipped when it already holds files. find_links: a folder holding the wheel (pip then
    runs with --no-index). Raises DownloadError (one line) when pip fails or the wheel lacks the masks."""
    dest = Path(dest)
    masks = dest / MASK_FOLDER
    if masks.is_dir() and any(masks.iterdir()):
        return masks
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".lung-masks-") as tmp:
        with zipfile.ZipFile(io.BytesIO(_masks_zip(_pip_download(Path(tmp), find_links)))) as zf:
            names = [n for n in zf.namelist() if n.startswith(MASK_FOLDER + "/") and not n.endswith("/")]
            if not names:
                raise DownloadError(f"{MASKS_ZIP} in the {WHEEL} wheel holds no {MASK_FOLDER}/ files")
            zf.extractall(tmp, members=names)  # extractall drops absolute and '..' parts of member names
        os.replace(Path(tmp) / MASK_FOLDER, masks)  # all or nothing: no half-extracted folder is left behind
    return masks


def _pip_download(folder: Path, find_links: str | None) -> Path:
    """The torchxrayvision wheel, downloaded by pip (without its dependencies) into folder."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           WHEEL, "-d", str(folder)]
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise DownloadError(f"pip download {WHEEL} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    wheels = sorted(folder.glob("torchxrayvision-*.whl"))
    if not wheels:
        raise DownloadError(f"pip download {WHEEL} succeeded but left no torchxrayvision wheel in {folder}")
    return wheels[0]


def _masks_zip(wheel: Path) -> bytes:
    """The bytes of the masks zip inside the wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(MASKS_ZIP)
    except KeyError:
        raise DownloadError(f"{wheel.name} has no member {MASKS_ZIP}") from None
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{wheel.name} is not a valid wheel ({exc})") from None


def paired_images(data: Path, mask_dir: Path) -> pd.DataFrame:
    """(image, mask) paths, plus patient_id when the metadata has it, for the images of a raw data folder in the
    generic CSV layout that have a mask. A mask is named like the original file in the source repository, so it is
    matched to the basename of `origin_path` (or of `path` when the CSV has no origin_path)."""
    data, mask_dir = Path(data), Path(mask_dir)
    csv = data / "metadata.csv"
    if not csv.is_file():
        raise MissingInputError(f"{csv} not found: expected a raw data folder with a metadata.csv (column path)")
    if not mask_dir.is_dir():
        raise MissingInputError(f"mask folder {mask_dir} not found (covidcxr lungs fetch prints it)")
    meta = pd.read_csv(csv, dtype=str)
    key = "origin_path" if "origin_path" in meta.columns else "path"
    masks = {p.name: p for p in mask_dir.iterdir() if p.is_file()}
    names = meta[key].fillna("").map(lambda p: Path(p).name)
    matched = meta[names.isin(masks.keys())]
    if matched.empty:
        raise InputError(f"no image of {csv} has a mask in {mask_dir} (matched on the file name in column {key})")
    pairs = pd.DataFrame({"image": [str(data / p) for p in matched["path"]],
                          "mask": [str(masks[n]) for n in names[matched.index]]})
    if "patient_id" in matched.columns:
        pairs["patient_id"] = matched["patient_id"].fillna("").to_numpy()
    return pairs.drop_duplicates("image").sort_values("image", ignore_index=True)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net: gray images (B, 1, H, W) in [0, 1] -> lung logits (B, 1, H, W), any H and W.

    Each image is standardised to zero mean and unit variance first, so the film's brightness and contrast (which
    differ by scanner and by how the image was exported) do not matter. Upsampling is bilinear (no checkerboard
    artefacts, no weights). `size` is the side the model was trained at; `segment` resizes to it."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS, size: int = 128):
        super().__init__()
        self.size = size
        self.down = nn.ModuleList(_block(c_in, c_out) for c_in, c_out in zip((1, *channels[:-1]), channels))
        self.up = nn.ModuleList(_block(wide + narrow, narrow) for wide, narrow in zip(channels[:0:-1], channels[-2::-1]))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) / (x.std(dim=(2, 3), keepdim=True) + 1e-3)
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for block, skip in zip(self.up, skips[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def _resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float resized (squashed) to size; antialiased, so thin structures are averaged, not skipped."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


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
        images.append(_resize(img, size))
        masks.append((_resize(drawn, size) > 0.5).float())
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


def load_lung_model(path: Path) -> LungUNet:
    """The LungUNet saved by train_lung_model, on the CPU, in eval mode, with its training `size`."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = LungUNet(tuple(ckpt["config"]["channels"]), int(ckpt["config"]["size"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


@torch.no_grad()  # not inference_mode: callers may edit the masks in place
def segment(model: LungUNet, images: torch.Tensor) -> torch.Tensor:
    """Boolean lung masks (B, 1, H, W), on the images' device, for gray images (B, 1, H, W) in [0, 1] of any size:
    predicted at the model's size, the probabilities resized back to H x W, only the two largest parts kept."""
    device = next(model.parameters()).device
    prob = torch.sigmoid(model(_resize(images.to(device, torch.float32), model.size)))
    return two_largest_parts(_resize(prob, tuple(images.shape[-2:])) > 0.5).to(images.device)


def two_largest_parts(masks: torch.Tensor) -> torch.Tensor:
    """Masks (B, 1, H, W) with only their two largest connected parts, the two lungs, kept. On ../shared/cxr one mask
    in ten has more parts, nearly always a blob outside the chest (an arm, bowel gas, a film edge) that would widen the
    lung box by up to half the film; a lung cut in two by the heart or an effusion, which loses its smaller part here,
    is far rarer, and the lung box's margin covers most of what it loses."""
    out = masks.cpu().numpy().copy()
    for mask in out.reshape(-1, *out.shape[-2:]):
        labels, n = ndimage.label(mask)
        if n > 2:
            mask[:] = np.isin(labels, 1 + np.argsort(np.bincount(labels.ravel())[1:])[-2:])
    return torch.from_numpy(out).to(masks.device)


def lung_boxes(masks: torch.Tensor, margin: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, 4) = (top, left, bottom, right) as fractions of the image side around each lung mask, grown by
    `margin`; and (B,) bool, True where the mask was empty or under MIN_LUNG_AREA of the image and the box is the
    whole image instead. Callers should report those: a whole-image box means no lungs were found, not that the
    lungs fill the film."""
    return mask_boxes(masks, margin, MIN_LUNG_AREA)
