"""One preprocessing, from a decoded image at its own size to the model's input, built from a run's settings.

`Preprocess` is a `torch.nn.Module`, so the very same code fills the ingest cache, normalises a training set once,
scores a file in `predict` and the service, and is traced into the exported ONNX / TorchScript graph. Its steps:

1. `to_cache`: `covidcxr.data.cache.to_cache_levels`, the step `ingest` stores as uint8: make the image square
   (pad with black, squash, or take the centre square), resize it to the cache side, round to gray levels 0..255.
2. `normalise`: crop (to the content box less a border, or to the lung box from the run's lung model), then
   histogram-equalize (global or CLAHE), rounded to gray levels again: the deterministic part of training's input.
3. `to_model`: scale to [0, 1] and resize to the model's side.

Every step rounds to the same gray levels the uint8 cache holds, so a file scored through `forward` and its cached
copy scored through `normalise_u8` + `to_model` give the model bit-identical input.
"""


import functools
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from covidcxr.data.cache import resize, to_cache_levels, to_levels
from covidcxr.lungs.boxes import content_boxes
from covidcxr.preprocess.spec import PreprocessSpec

if TYPE_CHECKING:  # imported where used: the lung model's module is only needed for crop="lungs"
    from covidcxr.lungs.unet import LungUNet

LUNG_MARGIN = 0.1  # crop="lungs": the lung box grown by this fraction of its size on each side (costophrenic angles)
NORMALISE_CHUNK = 256  # images normalised at once: bounds the memory of CLAHE and the lung model


def equalize(levels: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalization of gray levels (B, 1, H, W) -> values in [0, 1] (the CDF as a lookup table).

    The darkest level present maps to 0 and the brightest to 1; a constant image keeps its value. Written with
    scatter_add and gather (no bincount) so that it exports to ONNX."""
    batch = levels.shape[0]
    index = levels.reshape(batch, -1).long()
    pixels = index.shape[1]
    hist = torch.zeros(batch, 256, dtype=torch.float32, device=levels.device).scatter_add_(
        1, index, torch.ones_like(index, dtype=torch.float32))
    cdf = hist.cumsum(1)
    cdf_min = cdf.masked_fill(hist == 0, float(pixels)).amin(1, keepdim=True)  # cdf at the darkest level present
    span = pixels - cdf_min
    lut = ((cdf - cdf_min) / span.clamp(min=1)).clamp(0.0, 1.0)
    identity = torch.arange(256, device=levels.device, dtype=torch.float32) / 255
    lut = torch.where(span == 0, identity, lut)
    return lut.gather(1, index).reshape(levels.shape)


def clahe(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalization (kornia) of (B, 1, H, W) values in [0, 1], 8 x 8 tiles."""
    from kornia.enhance import equalize_clahe
    return equalize_clahe(x, clip_limit=clip, grid_size=(8, 8))


def border_boxes(levels: torch.Tensor, border: float) -> torch.Tensor:
    """(B, 4) crop boxes: the content box (padding and dark frames left out) less `border` of its side per edge,
    where burned-in text and side markers sit."""
    top, left, bottom, right = content_boxes(levels).unbind(1)
    dh, dw = (bottom - top) * border, (right - left) * border
    return torch.stack([top + dh, left + dw, bottom - dh, right - dw], dim=1)


def crop_to_boxes(levels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each (B, 1, S, S) image to its box (fractions) and stretch the box back to S x S (bilinear), rounded."""
    size = levels.shape[-1]
    top, left, bottom, right = boxes.to(levels.device, torch.float32).unbind(1)
    zeros = torch.zeros_like(top)
    # output-to-input map in normalised coordinates: the box's edges are at 2 * fraction - 1
    theta = torch.stack([right - left, zeros, left + right - 1, zeros, bottom - top, top + bottom - 1], dim=1)
    grid = F.affine_grid(theta.view(-1, 2, 3), [levels.shape[0], 1, size, size], align_corners=False)
    out = F.grid_sample(levels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255)


@functools.lru_cache(maxsize=4)
def _lung_model(path: str) -> "LungUNet":
    """The lung model, loaded once per process (prediction calls this for every image)."""
    from covidcxr.lungs.segment import load_lung_model
    return load_lung_model(path)


class Preprocess(nn.Module):
    """Decoded gray image (B, 1, H, W) in [0, 1] at its own size -> model input (B, 1, image_size, image_size).

    The settings are plain attributes and every step but CLAHE and the lung crop is TorchScript-able, so the module
    itself is what `export` puts in front of the model."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        aug = spec.augment
        self.square, self.cache_size, self.image_size = spec.square, spec.cache_size, spec.image_size
        self.equalize, self.crop, self.border, self.clahe_clip = aug.equalize, aug.crop, aug.border, aug.clahe_clip
        self.lung_model = aug.lung_model
        self.lungs = _lung_model(aug.lung_model) if aug.crop == "lungs" else None

    def to_cache(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] -> (B, 1, S, S) gray levels: square, resize to the cache side, round."""
        return to_cache_levels(image, self.square, self.cache_size)

    def normalise(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) gray levels -> gray levels after the crop and the equalization."""
        if self.crop == "border":
            levels = crop_to_boxes(levels, border_boxes(levels, self.border))
        elif self.crop == "lungs":
            levels = crop_to_boxes(levels, self.lung_boxes(levels))
        if self.equalize == "global":
            return to_levels(equalize(levels))
        if self.equalize == "clahe":
            return to_levels(self.clahe(levels / 255))
        return levels

    @torch.jit.unused
    def clahe(self, x: torch.Tensor) -> torch.Tensor:
        return clahe(x, self.clahe_clip)

    @torch.jit.unused
    def lung_boxes(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, 4) lung boxes from the run's lung model; an image without lungs found is kept whole, with a warning."""
        from covidcxr.lungs.segment import lung_boxes, segment
        assert self.lungs is not None  # normalise asks for lung boxes only with crop="lungs", which loads the model
        boxes, fell_back = lung_boxes(segment(self.lungs.to(levels.device), levels / 255), margin=LUNG_MARGIN)
        if fell_back.any():
            warnings.warn(f"lung crop: {int(fell_back.sum())} of {len(levels)} images have no lung mask from "
                          f"{self.lung_model}; they are kept whole", stacklevel=2)
        return boxes

    def to_model(self, levels: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) gray levels -> (B, 1, image_size, image_size) float32 in [0, 1]."""
        return resize(levels / 255, self.image_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.to_model(self.normalise(self.to_cache(image)))

    # uint8 views of the same steps, for the cache and the training set
    @torch.jit.unused
    @torch.no_grad()
    def normalise_u8(self, images: torch.Tensor) -> torch.Tensor:
        """(N, S, S) uint8 -> (N, S, S) uint8 after `normalise`, in chunks (a training set is normalised once)."""
        if (self.crop, self.equalize) == ("none", "none"):
            return images
        parts = [self.normalise(images[i:i + NORMALISE_CHUNK].unsqueeze(1).float()).squeeze(1).to(torch.uint8)
                 for i in range(0, len(images), NORMALISE_CHUNK)]
        return torch.cat(parts) if parts else images

    @torch.jit.unused
    def model_input_u8(self, normalised: torch.Tensor) -> torch.Tensor:
        """(N, S, S) uint8 already normalised -> (N, 1, image_size, image_size) model input."""
        return self.to_model(normalised.unsqueeze(1).float())
