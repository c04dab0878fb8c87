"""A pydicom decoder plugin for 12-bit JPEG Extended (process 4), through imagecodecs' libjpeg-turbo (BSD-3-Clause).

pydicom's own plugins decode JPEG Extended at 8 bits only (Pillow, GDCM); its one 12-bit decoder, pylibjpeg-libjpeg,
is GPLv3 and cannot ship with this MIT package. `covidcxr.data.reader` registers this module with pydicom, after its
own plugins, so pydicom still decodes 8-bit files as before. pydicom's plugin contract: `is_available(uid)`,
`DECODER_DEPENDENCIES` and a function that turns one encoded frame into raw little-endian pixel bytes.
"""

from __future__ import annotations

import imagecodecs
from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("imagecodecs>=2024.1.1",)}


def is_available(syntax: str) -> bool:
    """Only JPEG Extended, and only where imagecodecs was built with libjpeg-turbo."""
    return syntax == uid.JPEGExtended12Bit and bool(imagecodecs.JPEG8.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One 12-bit gray frame -> uint16 little-endian bytes (pydicom's container for 9..16 bit samples)."""
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("12-bit JPEG Extended colour is not supported (chest films are gray)")
    pixels = imagecodecs.jpeg8_decode(src)
    runner.set_option("bits_allocated", 16 if pixels.dtype.itemsize == 2 else 8)
    return pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
