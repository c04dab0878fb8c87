"""Random augmentation of a training batch of normalised uint8 squares, on the batch's own device.

The deterministic steps (square, resize, crop, equalization) are `covidcxr.preprocess.transform.Preprocess`, done
once per training set; what is here runs every step and only at training.

Everything works on the whole batch at once (no per-image Python loop), so feeding data costs a small fraction
of a training step on a CPU and next to nothing on a GPU. All randomness comes from one `torch.Generator`, so a
seeded run draws the same augmentations again.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from covidcxr.config import AugmentConfig

BLUR_SIGMA = (0.5, 1.5)  # pixels at the output size
BLUR_RADIUS = 4  # kernel half-width: covers 2.7 sigma at the largest sigma
RESOLUTION_FACTOR = (0.35, 0.8)  # down-sampling factor of the resolution jitter
JPEG_QUALITY = (30, 90)  # range of the JPEG re-compression quality

Uniform = Callable[[float, float], torch.Tensor]


def augment_batch(
    images: torch.Tensor,
    cfg: AugmentConfig,
    out_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, S, S) uint8, already normalised (`Preprocess.normalise_u8`) -> (B, 1, out_size, out_size) float32 in
    [0, 1], randomly augmented, on the images' device.

    Per-image gamma / brightness / contrast at the cached size, then one random affine (rotation, scale,
    translation, optional flip) that also resamples to out_size, so the image is interpolated once and the
    uncovered border is 0 = black like the cache's padding; then blur, resolution jitter and noise, which act on
    the pixels the model sees. Horizontal flips are off by default (cfg.hflip): the heart lies on the left in a
    chest X-ray, and side markers and text would read mirrored. `generator` must live on the images' device.
    """
    if images.dtype != torch.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"augment_batch expects square uint8 images (B, S, S), got {got}")
    x = images.unsqueeze(1).to(torch.float32).div_(255)
    batch, device = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator, device=device).view(batch, 1, 1, 1)

    x = _photometric(x, cfg, uniform)
    grid = affine_grid(_random_affine(batch, cfg, uniform), out_size)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.blur > 0:
        x = _blur(x, cfg.blur, uniform)
    if cfg.resolution_jitter > 0:
        x = _resolution_jitter(x, cfg.resolution_jitter, uniform)
    if cfg.jpeg > 0:
        x = _jpeg(x, cfg.jpeg, uniform)
    if cfg.noise > 0:
        x = x.addcmul_(torch.randn(x.shape, generator=generator, device=device), uniform(0.0, cfg.noise))
    return x.clamp_(0.0, 1.0)


def _photometric(x: torch.Tensor, cfg: AugmentConfig, uniform: Uniform) -> torch.Tensor:
    """Gamma, then contrast around each image's mean and brightness offset; clipped to [0, 1]."""
    if cfg.gamma > 0:
        x = x.pow(torch.exp(uniform(-cfg.gamma, cfg.gamma)))
    if cfg.brightness > 0 or cfg.contrast > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast)
        offset = mean * (1 - contrast) + uniform(-cfg.brightness, cfg.brightness)
        x = torch.addcmul(offset, x, contrast).clamp_(0.0, 1.0)  # (x - mean) * contrast + mean + brightness
    return x


def _random_affine(batch: int, cfg: AugmentConfig, uniform: Uniform) -> torch.Tensor:
    """(B, 2, 3) output-to-input maps in normalised coordinates: one rotation / zoom / shift (/ flip) per image."""
    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg).view(batch) * (math.pi / 180)
    zoom = uniform(*cfg.scale).view(batch)  # > 1 enlarges the content
    shift_x, shift_y = (uniform(-cfg.translate, cfg.translate).view(batch) * 2 for _ in range(2))  # [-1, 1] spans 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    flip = torch.where(uniform(0.0, 1.0).view(batch) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones_like(cos)
    return torch.stack([cos * flip, -sin, shift_x, sin * flip, cos, shift_y], dim=1).view(batch, 2, 3)


def affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, 1, size, size), align_corners=False) by broadcasting: F.affine_grid's batched
    matrix product with an inner size of 3 takes ~3 ms per 1024 images at 224 px on an H200, this ~0.2 ms."""
    coords = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    xs, ys = coords.view(1, 1, size), coords.view(1, size, 1)
    t = theta.view(-1, 6, 1, 1).unbind(1)
    grid = torch.empty(theta.shape[0], size, size, 2, device=theta.device, dtype=theta.dtype)
    torch.add(t[0] * xs + t[2], t[1] * ys, out=grid[..., 0])
    torch.add(t[3] * xs + t[5], t[4] * ys, out=grid[..., 1])
    return grid


def _blur(x: torch.Tensor, prob: float, uniform: Uniform) -> torch.Tensor:
    """Gaussian blur with a random sigma on a random subset (a delta kernel leaves the others unchanged)."""
    batch, _, height, width = x.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=x.device, dtype=x.dtype)
    sigma = uniform(*BLUR_SIGMA).view(batch, 1)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    delta = (taps == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(uniform(0.0, 1.0).view(batch, 1) < prob, kernel, delta)
    size = 2 * BLUR_RADIUS + 1
    y = F.pad(x.view(1, batch, height, width), (BLUR_RADIUS,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(batch, 1, 1, size), groups=batch)  # separable: rows, then columns
    y = F.conv2d(y, kernel.view(batch, 1, size, 1), groups=batch)
    return y.view(batch, 1, height, width)


def _resolution_jitter(x: torch.Tensor, prob: float, uniform: Uniform) -> torch.Tensor:
    """Down- then up-sample a random subset, imitating low-resolution sources.

    One factor per batch (reading it costs one device sync), because per-image sizes cannot be batched.
    """
    size = x.shape[-1]
    factor = float(uniform(*RESOLUTION_FACTOR)[0])
    low = F.interpolate(x, size=max(8, round(size * factor)), mode="bilinear", antialias=True, align_corners=False)
    back = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return torch.where(uniform(0.0, 1.0) < prob, back, x)


def _jpeg(x: torch.Tensor, prob: float, uniform: Uniform) -> torch.Tensor:
    """Re-compress a random subset as JPEG (Pillow) at one random quality per batch, imitating the artefacts of
    web-collected figures. It runs per image on the CPU (about 0.2 ms each at 112 px): off by default, an option for
    the shortcut experiments rather than part of the fast path."""
    quality = int(uniform(*JPEG_QUALITY)[0])
    chosen = torch.nonzero((uniform(0.0, 1.0) < prob).view(-1)).flatten().tolist()
    pixels = x.mul(255).round_().to(torch.uint8).cpu().numpy()
    out = x.clone()
    for i in chosen:
        buf = io.BytesIO()
        Image.fromarray(pixels[i, 0]).save(buf, format="JPEG", quality=quality)
        out[i, 0] = torch.from_numpy(np.array(Image.open(buf))).to(x.device, x.dtype).div_(255)
    return out
