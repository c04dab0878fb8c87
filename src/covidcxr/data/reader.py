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

from covidcxr.errors import ImageReadError

MAX_PIXELS = 100_000_000  # decompression-bomb guard: no chest X-ray has 100 megapixels
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, what Pillow's "L" uses


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
    except Image.DecompressionBombError as exc:  # Pillow's own guard fires first for headers above ~179 megapixels
        raise ImageReadError(label, f"image too large ({exc})") from None
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
    try:
        gray = _dicom_gray(arr, ds, label)
    except ImageReadError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:  # bad LUT / window values
        raise ImageReadError(label, f"invalid DICOM rescale or window ({exc})".splitlines()[0]) from None
    return 1.0 - gray if photometric == "MONOCHROME1" else gray


def _dicom_gray(arr: np.ndarray, ds: pydicom.Dataset, label: str) -> np.ndarray:
    """Rescale (modality LUT), then the file's window / VOI LUT mapped so that its ends are 0 and 1.

    The window is the display the file asks for, so it is not stretched again to the image's own range (an image
    whose pixels all lie inside the window keeps its mid-grey look). Without a window: the image's own range.
    """
    values = apply_modality_lut(arr, ds)
    if "VOILUTSequence" not in ds and not ("WindowCenter" in ds and "WindowWidth" in ds):
        return _minmax(np.asarray(values, dtype=np.float32), label)
    bits = int(ds.BitsStored)
    extremes = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if int(ds.get("PixelRepresentation", 0)) == 1
                        else [0, 2**bits - 1])
    lo, hi = (float(v) for v in apply_voi_lut(apply_modality_lut(extremes, ds), ds))
    if hi == lo:
        raise ImageReadError(label, "DICOM window maps every value to one grey level")
    shown = (np.asarray(apply_voi_lut(values, ds), dtype=np.float64) - lo) / (hi - lo)
    return np.clip(shown, 0.0, 1.0).astype(np.float32)
