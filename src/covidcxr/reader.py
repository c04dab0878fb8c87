"""One decoder for every supported file: PNG (8/16 bit), JPEG, TIFF, BMP and DICOM -> 2-D float32 gray in [0, 1].

Every caller (ingest, predict, serve) goes through `read_image`, so a file is understood the same way everywhere.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

MAX_PIXELS = 100_000_000  # decompression-bomb guard: no chest X-ray has 100 megapixels
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, what Pillow's "L" uses


class ImageReadError(ValueError):
    """A file that cannot be turned into an image; `reason` is one short human sentence."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def read_image(source: str | Path | bytes, name: str = "<upload>") -> np.ndarray:
    """Decode a path or raw bytes into a 2-D float32 array in [0, 1]; raise ImageReadError on any failure."""
    label = name if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(label, "file not found") from None
    except OSError as exc:
        raise ImageReadError(label, f"cannot open file ({exc.strerror or exc})") from None
    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")
    if _is_dicom(data, label):
        return _read_dicom(data, label)
    return _read_pillow(data, label)


def _is_dicom(data: bytes, label: str) -> bool:
    return data[128:132] == b"DICM" or label.lower().endswith((".dcm", ".dicom"))


def _read_pillow(data: bytes, label: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageReadError(label, "not an image (unrecognised content)") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageReadError(label, f"image too large ({width}x{height} pixels; limit {MAX_PIXELS:,})")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(label, f"truncated or corrupt image ({exc})") from None
    return _to_gray(img, label)


def _to_gray(img: Image.Image, label: str) -> np.ndarray:
    """Colour -> luminance; alpha composited on black; 16-bit and float scaled by their own range."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return (rgba[..., :3] @ LUMA) * rgba[..., 3]
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB"), dtype=np.float32) @ LUMA / 255.0
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _minmax(np.asarray(img, dtype=np.float32), label)
    raise ImageReadError(label, f"unsupported pixel format {mode!r}")


def _minmax(arr: np.ndarray, label: str) -> np.ndarray:
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        raise ImageReadError(label, "blank image (all pixels equal)")
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _read_dicom(data: bytes, label: str) -> np.ndarray:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise ImageReadError(label, f"not a readable DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise ImageReadError(label, f"image too large ({cols}x{rows} pixels; limit {MAX_PIXELS:,})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(label, f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not a radiograph")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types: missing decoder plugin, bad length, bit depth
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise ImageReadError(label, f"cannot decode DICOM pixels ({name}): {exc}".splitlines()[0]) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3:  # colour DICOM (secondary capture): convert to luminance
        return _minmax(arr[..., :3].astype(np.float32) @ LUMA, label)
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else arr
    gray = _minmax(np.asarray(arr, dtype=np.float32), label)
    return 1.0 - gray if photometric == "MONOCHROME1" else gray
