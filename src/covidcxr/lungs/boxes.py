"""Boxes around image content and around lung masks: the one implementation the crop, the heuristic lung mask and
the diagnostics share."""

from __future__ import annotations

import numpy as np
import torch

CONTENT_LEVEL = 8  # a row or column whose brightest pixel is darker than this (of 255) is padding


def _span(filled: torch.Tensor, n: int, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First and (exclusive) last filled position along dim 1, as fractions of n, each grown by `margin`."""
    first = filled.int().argmax(dim=1)
    last = n - filled.flip(1).int().argmax(dim=1)
    grow = margin * (last - first) / n
    return (first / n - grow).clamp(0, 1), (last / n + grow).clamp(0, 1)


def mask_boxes(masks: torch.Tensor, margin: float = 0.0, min_area: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, 4) = (top, left, bottom, right) as fractions of the side around each mask (B, [1,] H, W), grown by
    `margin` of the box's height (width) on each side and clipped to [0, 1]; and (B,) bool, True where the mask is
    empty or covers less than `min_area` of the image, whose box is then the whole image. TorchScript-able: the
    exported graph crops with it."""
    h, w = masks.shape[-2], masks.shape[-1]
    masks = masks.reshape(masks.shape[0], h, w).to(torch.bool)
    top, bottom = _span(masks.any(dim=2), h, margin)
    left, right = _span(masks.any(dim=1), w, margin)
    boxes = torch.stack([top, left, bottom, right], dim=1).float()
    whole = ~masks.flatten(1).any(1) | (masks.float().mean(dim=(1, 2)) < min_area)
    full = torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
    return torch.where(whole.unsqueeze(1), full, boxes), whole


def content_boxes(levels: torch.Tensor, level: int = CONTENT_LEVEL) -> torch.Tensor:
    """(B, 4) boxes (top, left, bottom, right), as fractions of the side, of the rows and columns that hold image
    content in gray levels 0..255 (B, [1,] H, W): the dark bands of padding to square (or of a scanner's frame) are
    left out; an all-dark image is whole."""
    return mask_boxes(levels > level)[0]


def content_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel bounds of the content of one uint8 image (`content_boxes` in pixels)."""
    h, w = image.shape
    top, left, bottom, right = content_boxes(torch.from_numpy(np.ascontiguousarray(image))[None])[0].tolist()
    return round(top * h), round(bottom * h), round(left * w), round(right * w)
