"""A small learned lung segmentation model: a tiny U-Net, kept apart from its training and inference so that
loading a lung model needs neither pip nor the training code.

The heuristic in `lungs` needs no weights but is coarse (Dice 0.75 against drawn lungs); a learned mask lets
training crop each film to its lungs and lets the shortcut diagnostics blank or keep the lungs more exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = (8, 16, 32, 64)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU: one U-Net level."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net: gray images (B, 1, H, W) in [0, 1] -> lung logits (B, 1, H, W), any H and W.

    Each image is standardised to zero mean and unit variance first, so the film's brightness and contrast (which
    differ by scanner and by how the image was exported) do not matter. Upsampling is bilinear (no checkerboard
    artefacts, no weights). `size` is the side the model was trained at; `segment` resizes to it."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS, size: int = 128) -> None:
        super().__init__()
        self.size = size
        self.down = nn.ModuleList(_block(c_in, c_out) for c_in, c_out in zip((1, *channels[:-1]), channels))
        self.up = nn.ModuleList(_block(wide + narrow, narrow)
                                for wide, narrow in zip(channels[:0:-1], channels[-2::-1]))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise each image, then down and up with skips, so lung edges keep their full resolution."""
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


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float resized (squashed) to size; antialiased, so thin structures are averaged, not skipped.
    Training and `segment` both use it, so a film reaches the model at the same size and smoothing either way."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
