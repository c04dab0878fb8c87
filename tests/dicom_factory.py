"""Small DICOM files in every transfer syntax and photometric a hospital may send, made from a synthetic film.

An uncompressed file (conftest's `Images.dicom`) is re-encoded: pydicom writes the uncompressed and deflated syntaxes
and compresses RLE, JPEG-LS and JPEG 2000 with the plugins the package depends on; the JPEG processes (baseline,
extended 12-bit, lossless 14 and 14 SV1), which pydicom cannot encode, come from imagecodecs' libjpeg-turbo (a dev
dependency).
"""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import UID, ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1

JPEG_PROCESSES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)


def film(height: int = 64, width: int = 48, bits: int = 12) -> np.ndarray:
    """A uint16 gradient with a bright disc: smooth regions and sharp edges, like a chest film's body and ribs."""
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (yy / (height - 1) * 0.6 + xx / (width - 1) * 0.2)
    disc = ((yy - height * 0.55) ** 2 + (xx - width * 0.4) ** 2) < (min(height, width) * 0.25) ** 2
    return np.rint((ramp + 0.2 * disc) * (2**bits - 1)).astype(np.uint16)


def colour_film(height: int = 64, width: int = 48) -> np.ndarray:
    """An 8-bit RGB picture whose channels differ, so a wrong colour conversion changes its luminance."""
    gray = film(height, width, bits=8).astype(np.float32)
    return np.clip(np.stack([gray, gray * 0.8 + 40, 255 - gray * 0.6], axis=-1), 0, 255).astype(np.uint8)


def uncompressed(images, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> bytes:
    """Explicit VR little endian file for uint16 gray, uint8 gray or uint8 RGB/YBR pixels (Images.dicom + tags)."""
    if pixels.dtype == np.uint16:
        return images.dicom(None, pixels, photometric, **tags)
    samples = 3 if pixels.ndim == 3 else 1
    layout = {"SamplesPerPixel": samples, "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7,
              "Rows": pixels.shape[0], "Columns": pixels.shape[1], "PixelData": pixels.tobytes()}
    if samples == 3:
        layout["PlanarConfiguration"] = 0
    return images.dicom(None, None, photometric, **{**layout, **tags})


def ybr_full(images, rgb: np.ndarray) -> bytes:
    """The RGB picture stored as uncompressed YBR_FULL (what some modalities send)."""
    return uncompressed(images, convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")


def transcode(data: bytes, syntax: UID, **options) -> bytes:
    """Re-encode an uncompressed file in `syntax`; options go to the encoder (e.g. jls_error, j2k_cr, level)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if syntax in JPEG_PROCESSES:
        _jpeg(ds, syntax, **options)
    elif syntax.is_compressed:
        ds.compress(syntax, **options)
    else:
        if syntax == ExplicitVRBigEndian and ds.BitsAllocated == 16:  # pydicom writes pixel bytes as they are
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _jpeg(ds: pydicom.Dataset, syntax: UID, **options) -> None:
    """libjpeg-turbo: lossy at the file's bit depth (8 or 12), or lossless with predictor 1 (SV1) or `predictor`."""
    pixels = ds.pixel_array
    if syntax in (JPEGLossless, JPEGLosslessSV1):
        options = {"lossless": True, "predictor": 1 if syntax == JPEGLosslessSV1 else 6, **options}
    frame = imagecodecs.jpeg8_encode(pixels, bitspersample=int(ds.BitsStored), **options)
    if pixels.ndim == 3:  # libjpeg stores colour as YCbCr, subsampled when asked
        ds.PhotometricInterpretation = "YBR_FULL_422" if options.get("subsampling") == "422" else "YBR_FULL"
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
