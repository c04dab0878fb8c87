"""Grad-CAM explanations (pytorch-grad-cam) for the COVID-19 class, overlaid on the X-ray as the model sees it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tqdm import tqdm

from covidcxr.model.network import unwrap


def grad_cam(model: torch.nn.Module, x: torch.Tensor, class_index: int) -> np.ndarray:
    """Heatmaps (B, H, W) in [0, 1] at the input's size: where evidence for `class_index` comes from."""
    net = unwrap(model)
    with GradCAM(model=net, target_layers=[net.cam_layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)] * len(x))


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 image: the gray X-ray with the heatmap in the jet colour map on top."""
    rgb = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2).astype(np.float32)  # resizing can overshoot 1
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=1 - alpha)


OVERLAY_MIN_SIDE = 448  # model inputs are small (112 px by default); a person needs a larger picture


def cam_overlay(scorer, square: np.ndarray) -> Image.Image:
    """The overlay of what the model saw for one cache square, enlarged (bicubic) to at least OVERLAY_MIN_SIDE pixels
    for viewing. `scorer` is a `covidcxr.scoring.Scorer` (its float model, its preprocessing)."""
    x = next(scorer.inputs(square[None]))
    heatmap = grad_cam(scorer.model, x, scorer.spec.positive_index)[0]
    image = Image.fromarray(overlay(x[0, 0].detach().cpu().numpy(), heatmap))
    scale = -(-OVERLAY_MIN_SIDE // image.width)  # ceil: whole-number enlargement keeps the map aligned
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC) if scale > 1 else image


def cam_overlay_png(scorer, square: np.ndarray) -> bytes:
    buf = io.BytesIO()
    cam_overlay(scorer, square).save(buf, format="PNG")
    return buf.getvalue()


def write_cams(scorer, items: list[tuple[Path, np.ndarray]], out_dir: Path) -> list[Path]:
    """One overlay PNG per (file, cache square), named <stem>_cam.png (<stem>_2_cam.png ... when stems repeat, e.g.
    a.png and a.jpg, so no overlay overwrites another)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path, square in tqdm(items, desc="grad-cam", unit="img", disable=len(items) < 2):
        target = _unused_name(out_dir, path.stem, set(written))
        cam_overlay(scorer, square).save(target)
        written.append(target)
    return written


def _unused_name(out_dir: Path, stem: str, taken: set[Path]) -> Path:
    """<stem>_cam.png, or <stem>_<n>_cam.png when this call already wrote that name."""
    target, n = out_dir / f"{stem}_cam.png", 1
    while target in taken:
        n += 1
        target = out_dir / f"{stem}_{n}_cam.png"
    return target
