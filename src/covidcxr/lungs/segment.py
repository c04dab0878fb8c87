"""Lung masks and lung boxes from a trained LungUNet: what `--crop lungs` and the shortcut diagnostics use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from covidcxr.lungs.boxes import mask_boxes
from covidcxr.lungs.unet import LungUNet, resize

MIN_LUNG_AREA = 0.02  # a mask smaller than this share of the image counts as no lungs found


def load_lung_model(path: str | Path) -> LungUNet:
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
    prob = torch.sigmoid(model(resize(images.to(device, torch.float32), model.size)))
    return two_largest_parts(resize(prob, (images.shape[-2], images.shape[-1])) > 0.5).to(images.device)


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
