"""Turn a batch of cached uint8 images into model input, augmenting on the batch's own device.

Everything works on the whole batch at once (no per-image Python loop), so feeding data costs a small fraction
of a training step on a CPU and next to nothing on a GPU. All randomness comes from one `torch.Generator`, so a
seeded run draws the same augmentations again.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from covidcxr.config import AugmentConfig
from covidcxr.lungs.heuristic import CONTENT_LEVEL

BLUR_SIGMA = (0.5, 1.5)  # pixels at the output size
BLUR_RADIUS = 4  # kernel half-width: covers 2.7 sigma at the largest sigma
RESOLUTION_FACTOR = (0.35, 0.8)  # down-sampling factor of the resolution jitter
JPEG_QUALITY = (30, 90)  # range of the JPEG re-compression quality
LUNG_MARGIN = 0.1  # crop="lungs": the lung box grown by this fraction of its size on each side (costophrenic angles)

Uniform = Callable[[float, float], torch.Tensor]


def prepare_batch(
    images: torch.Tensor,
    train: bool,
    cfg: AugmentConfig,
    out_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, S, S) uint8 -> (B, 1, out_size, out_size) float32 in [0, 1], on the images' device.

    train=False: `normalise` (crop, equalization), then an antialiased resize; nothing random.
    train=True: `normalise`, then per-image gamma / brightness / contrast at the cached size, then one random
    affine (rotation, scale, translation, optional flip) that also resamples to out_size, so the image is
    interpolated once and the uncovered border is 0 = black like the cache's padding; then blur, resolution
    jitter and noise, which act on the pixels the model sees. Horizontal flips are off by default (cfg.hflip):
    the heart lies on the left in a chest X-ray, and side markers and text would read mirrored.
    `generator` must live on the images' device.
    """
    if images.dtype != torch.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"prepare_batch expects square uint8 images (B, S, S), got {got}")
    x = normalise(images, cfg)
    if not train:
        return _resize(x, out_size)
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


def normalise(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """(B, S, S) uint8 -> (B, 1, S, S) float32 in [0, 1]: the deterministic preprocessing that every image gets, at
    training and at evaluation, so that all sources go through one path: the crop (cfg.crop), then equalization."""
    if cfg.crop != "none":
        images = crop_to_boxes(images, crop_boxes(images, cfg))
    if cfg.equalize == "global":
        return equalize(images).unsqueeze(1)
    x = images.unsqueeze(1).to(torch.float32).div_(255)
    return clahe(x, cfg.clahe_clip) if cfg.equalize == "clahe" else x


def normalise_once(images: torch.Tensor, cfg: AugmentConfig, chunk: int = 256) -> tuple[torch.Tensor, AugmentConfig]:
    """`normalise` a whole image set once, rounded back to uint8, with the settings that skip it from then on.

    It is deterministic and comes before any random augmentation, so training need not repeat it every epoch
    (equalization alone is about 40 % of a CPU training step's augmentation time); rounding moves a pixel by at most
    half a gray level. Chunks bound the memory of CLAHE and the lung model."""
    done = replace(cfg, equalize="none", crop="none")
    if (cfg.equalize, cfg.crop) == ("none", "none"):
        return images, done
    parts = [normalise(images[i:i + chunk], cfg).squeeze(1).mul_(255).round_().to(torch.uint8)
             for i in range(0, len(images), chunk)]
    return (torch.cat(parts) if parts else images), done


def clahe(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalization (kornia) of (B, 1, H, W) floats in [0, 1], 8 x 8 tiles."""
    from kornia.enhance import equalize_clahe
    return equalize_clahe(x, clip_limit=clip, grid_size=(8, 8))


def crop_boxes(images: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """(B, 4) crop boxes (top, left, bottom, right) as fractions of the side, for cfg.crop."""
    if cfg.crop == "border":
        top, left, bottom, right = content_boxes(images).unbind(1)
        dh, dw = (bottom - top) * cfg.border, (right - left) * cfg.border
        return torch.stack([top + dh, left + dw, bottom - dh, right - dw], dim=1)
    from covidcxr.lungs.unet import lung_boxes, segment
    masks = segment(_lung_model(cfg.lung_model, images.device), images.unsqueeze(1).to(torch.float32).div(255))
    boxes, fell_back = lung_boxes(masks, margin=LUNG_MARGIN)
    if fell_back.any():
        warnings.warn(f"lung crop: {int(fell_back.sum())} of {len(images)} images have no lung mask from "
                      f"{cfg.lung_model}; they are kept whole", stacklevel=2)
    return boxes


@functools.lru_cache(maxsize=4)
def _lung_model(path: str, device: torch.device) -> torch.nn.Module:
    """The lung model, loaded once per process and device (prediction calls this for every image)."""
    from covidcxr.lungs.unet import load_lung_model
    return load_lung_model(path).to(device)


def content_boxes(images: torch.Tensor) -> torch.Tensor:
    """(B, 4) boxes (top, left, bottom, right), as fractions of the side, of the rows and columns that hold image
    content: the dark bands of padding to square (or of a scanner's frame) are left out; an all-dark image is whole."""
    return mask_boxes(images > CONTENT_LEVEL)[0]


def mask_boxes(masks: torch.Tensor, margin: float = 0.0, min_area: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, 4) = (top, left, bottom, right) as fractions of the side around each mask (B, [1,] H, W), grown by
    `margin` of the box's height (width) on each side and clipped to [0, 1]; and (B,) bool, True where the mask is
    empty or covers less than `min_area` of the image, whose box is then the whole image."""
    masks = masks.reshape(masks.shape[0], *masks.shape[-2:]).bool()
    h, w = masks.shape[-2:]

    def span(filled: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = filled.int().argmax(dim=1)
        last = n - filled.flip(1).int().argmax(dim=1)  # exclusive end
        grow = margin * (last - first) / n
        return (first / n - grow).clamp(0, 1), (last / n + grow).clamp(0, 1)

    (top, bottom), (left, right) = span(masks.any(dim=2), h), span(masks.any(dim=1), w)
    boxes = torch.stack([top, left, bottom, right], dim=1).float()
    whole = ~masks.flatten(1).any(1) | (masks.float().mean(dim=(1, 2)) < min_area)
    boxes[whole] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
    return boxes, whole


def crop_to_boxes(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each (B, S, S) uint8 image to its box (fractions) and stretch the box back to S x S (bilinear)."""
    size = images.shape[-1]
    top, left, bottom, right = boxes.to(images.device, torch.float32).unbind(1)
    zeros = torch.zeros_like(top)
    # output-to-input map in normalised coordinates: the box's edges are at 2 * fraction - 1
    theta = torch.stack([right - left, zeros, left + right - 1, zeros, bottom - top, top + bottom - 1], dim=1)
    x = images.unsqueeze(1).to(torch.float32)
    out = F.grid_sample(x, affine_grid(theta.view(-1, 2, 3), size), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.squeeze(1).round_().clamp_(0, 255).to(torch.uint8)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalization of uint8 (B, H, W) -> float32 in [0, 1] (the CDF as a lookup table).

    The darkest level present maps to 0 and the brightest to 1; a constant image keeps its value. One int32 index
    per pixel (image * 256 + level) serves both the batched histogram and the table lookup.
    """
    batch = images.shape[0]
    offsets = 256 * torch.arange(batch, device=images.device, dtype=torch.int32).unsqueeze(1)
    index = (images.reshape(batch, -1) + offsets).view(-1)  # uint8 + int32 -> int32
    pixels = index.numel() // batch
    hist = torch.bincount(index, minlength=256 * batch).view(batch, 256)
    cdf = hist.cumsum(1)
    cdf_min = cdf.masked_fill(hist == 0, pixels).amin(1, keepdim=True)  # cdf at the darkest level present
    span = pixels - cdf_min
    lut = ((cdf - cdf_min).float() / span.clamp(min=1)).clamp_(0.0, 1.0)
    identity = torch.arange(256, device=images.device, dtype=torch.float32) / 255
    lut = torch.where(span == 0, identity, lut)
    return lut.view(-1).index_select(0, index).view(images.shape)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


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
