"""One decoder for every supported file: PNG (8/16 bit), JPEG, TIFF, BMP and DICOM -> 2-D float32 gray in [0, 1].

Every caller (ingest, predict, serve) goes through `read_image`, so a file is understood the same way everywhere.

DICOM: every transfer syntax a hospital sends decodes in a default install (uncompressed little/big endian, deflated,
RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000), through pydicom and the decoder plugins that pyproject.toml
lists; MONOCHROME1/2, RGB, YBR_FULL(_422) and PALETTE COLOR films all become gray. Only chest radiographs are read:
a DICOM whose Modality is not CR, DX or DR, whose BodyPartExamined is set to anything but CHEST, or whose ViewPosition
is lateral (LL, RL, LATERAL) is refused, since the model learnt frontal chest films only. A missing or empty Modality
is accepted (older files leave it out). Multi-frame files are refused: one film is one frame. PNG, JPEG, TIFF and BMP
files carry no such tags, so they are read as they are.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import JPEGExtended12Bit

from covidcxr.errors import ImageReadError, ImageRefused

MAX_PIXELS = 100_000_000  # decompression-bomb guard: no chest X-ray has 100 megapixels
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, what Pillow's "L" uses
CHEST_MODALITIES = ("CR", "DX", "DR")  # computed and digital radiography (DR: a common non-standard spelling of DX)
LATERAL_VIEWS = ("LL", "RL", "LATERAL")

# pydicom tries its own plugins first; this one decodes the 12-bit files they refuse (see covidcxr.data.jpeg12)
get_decoder(JPEGExtended12Bit).add_plugin("covidcxr-jpeg12", ("covidcxr.data.jpeg12", "decode_frame"))


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


DICOM_FIELDS = {"modality": "Modality", "manufacturer": "Manufacturer", "view": "ViewPosition",
                "sex": "PatientSex", "age": "PatientAge", "date": "StudyDate"}


def dicom_fields(path: str | Path) -> dict[str, str]:
    """The header's modality, manufacturer, view, sex, age and study date (raw text; '' where absent) of a DICOM file,
    {} for any other file: what a site's subgroups are made of when no metadata table lists them."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(132)
        if not _is_dicom(head, str(path)):
            return {}
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError):
        return {}
    return {field: str(ds.get(keyword, "") or "").strip() for field, keyword in DICOM_FIELDS.items()}


def _is_dicom(data: bytes, label: str) -> bool:
    return data[128:132] == b"DICM" or label.lower().endswith((".dcm", ".dicom"))


def _read_pillow(data: bytes, label: str) -> np.ndarray:
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
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
    _require_chest_radiograph(ds, label)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise ImageReadError(label, f"image too large ({cols}x{rows} pixels; limit {MAX_PIXELS:,})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(label, f"multi-frame DICOM ({ds.NumberOfFrames} frames): send each film as its own file")
    try:
        arr = ds.pixel_array  # YBR_FULL / YBR_FULL_422 come back as RGB
    except Exception as exc:  # pydicom raises many types: missing decoder plugin, bad length, bit depth
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise ImageReadError(label, f"cannot decode DICOM pixels ({name}): {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = _palette_to_rgb(arr, ds, label)
    if arr.ndim == 3:  # colour DICOM (secondary capture): convert to luminance
        return _minmax(arr[..., :3].astype(np.float32) @ LUMA, label)
    try:
        gray = _dicom_gray(arr, ds, label)
    except ImageReadError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:  # bad LUT / window values
        raise ImageReadError(label, f"invalid DICOM rescale or window ({exc})") from None
    return 1.0 - gray if photometric == "MONOCHROME1" else gray


def _require_chest_radiograph(ds: pydicom.Dataset, label: str) -> None:
    """Refuse films the model was never taught: other modalities, other body parts, lateral views (module docstring)."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in CHEST_MODALITIES:
        raise ImageRefused(label, f"not a chest radiograph: Modality {modality}")
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part != "CHEST":
        raise ImageRefused(label, f"not a chest radiograph: BodyPartExamined {body_part}")
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        raise ImageRefused(label, f"a lateral view (ViewPosition {view}): only frontal chest radiographs are scored")


def _palette_to_rgb(arr: np.ndarray, ds: pydicom.Dataset, label: str) -> np.ndarray:
    """PALETTE COLOR pixels are indices into the file's colour tables: look them up before taking luminance."""
    try:
        return apply_color_lut(arr, ds)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise ImageReadError(label, f"invalid DICOM palette ({exc})") from None


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
