"""Every DICOM encoding a hospital sends decodes to the same picture; only chest radiographs reach ingest, predict,
serve.

Each file is made here from a small synthetic film (tests/dicom_factory.py), so every case checks a real encoder's
output against the picture it was made from.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

import dicom_factory as make
from conftest import run_cli, xray
from covidcxr.data.reader import read_image

LUMA = np.array([0.299, 0.587, 0.114])
CT_REASON = "not a chest radiograph: Modality CT"

LOSSLESS = {
    "implicit VR little endian": (ImplicitVRLittleEndian, {}),
    "explicit VR big endian": (ExplicitVRBigEndian, {}),
    "deflated explicit VR little endian": (DeflatedExplicitVRLittleEndian, {}),
    "RLE lossless": (RLELossless, {}),
    "JPEG lossless process 14": (JPEGLossless, {}),
    "JPEG lossless process 14 SV1": (JPEGLosslessSV1, {}),
    "JPEG-LS lossless": (JPEGLSLossless, {}),
    "JPEG 2000 lossless": (JPEG2000Lossless, {}),
}
LOSSY = {
    "JPEG extended 12-bit": (JPEGExtended12Bit, {"level": 90}),
    "JPEG-LS near-lossless": (JPEGLSNearLossless, {"jls_error": 3}),
    "JPEG 2000 lossy": (JPEG2000, {"j2k_cr": [8]}),
}


def _encoded(source: bytes, syntax, options: dict) -> bytes:
    """The source re-encoded; checks the file really carries that transfer syntax."""
    data = make.transcode(source, syntax, **options)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    return data


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _minmax(arr: np.ndarray) -> np.ndarray:
    return (arr - arr.min()) / (arr.max() - arr.min())


@pytest.mark.parametrize("syntax, options", LOSSLESS.values(), ids=LOSSLESS.keys())
def test_lossless_encodings_decode_exactly(images, syntax, options):
    source = make.uncompressed(images, make.film())
    expected = read_image(source, "source.dcm")
    np.testing.assert_array_equal(read_image(_encoded(source, syntax, options), "coded.dcm"), expected)


@pytest.mark.parametrize("syntax, options", LOSSY.values(), ids=LOSSY.keys())
def test_lossy_encodings_decode_close(images, syntax, options):
    source = make.uncompressed(images, make.film())
    expected = read_image(source, "source.dcm")
    got = read_image(_encoded(source, syntax, options), "coded.dcm")
    assert got.shape == expected.shape and got.dtype == np.float32
    assert _correlation(got, expected) > 0.99


def test_jpeg_baseline_8bit_decodes_close(images):
    source = make.uncompressed(images, make.film(bits=8).astype(np.uint8))
    expected = read_image(source, "source.dcm")
    got = read_image(_encoded(source, JPEGBaseline8Bit, {"level": 90}), "coded.dcm")
    assert _correlation(got, expected) > 0.99 and np.abs(got - expected).mean() < 0.02


def test_monochrome1_compressed_is_inverted(images):
    film = make.film()
    m2 = read_image(make.uncompressed(images, film), "m2.dcm")
    m1 = make.transcode(make.uncompressed(images, film, "MONOCHROME1"), JPEG2000Lossless)
    np.testing.assert_allclose(read_image(m1, "m1.dcm"), 1.0 - m2, atol=1e-6)


def test_rgb_becomes_luminance(images):
    rgb = make.colour_film()
    got = read_image(make.uncompressed(images, rgb, "RGB"), "rgb.dcm")
    np.testing.assert_allclose(got, _minmax(rgb @ LUMA), atol=1e-5)


def test_ybr_full_is_converted_to_rgb_first(images):
    rgb = make.colour_film()
    got = read_image(make.ybr_full(images, rgb), "ybr.dcm")
    np.testing.assert_allclose(got, _minmax(rgb @ LUMA), atol=0.01)  # 8-bit YCbCr round trip


def test_ybr_full_422_jpeg_is_converted_to_rgb_first(images):
    rgb = make.colour_film()
    data = _encoded(make.uncompressed(images, rgb, "RGB"), JPEGBaseline8Bit, {"level": 95, "subsampling": "422"})
    assert pydicom.dcmread(io.BytesIO(data)).PhotometricInterpretation == "YBR_FULL_422"
    got = read_image(data, "ybr422.dcm")
    assert _correlation(got, _minmax(rgb @ LUMA)) > 0.99


def test_palette_colour_uses_the_colour_tables(images):
    """Indices 0..3 into 16-bit red/green/blue tables: the gray is the luminance of the looked-up colours."""
    red, green, blue = (np.array(c, np.uint16) for c in ([0, 65535, 0, 30000], [0, 0, 65535, 30000],
                                                          [0, 0, 0, 60000]))
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    tables = {}
    for colour, table in zip(("Red", "Green", "Blue"), (red, green, blue)):
        tables[f"{colour}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        tables[f"{colour}PaletteColorLookupTableData"] = table.tobytes()
    got = read_image(make.uncompressed(images, indices, "PALETTE COLOR", **tables), "palette.dcm")
    colours = np.stack([red, green, blue], axis=-1)[indices].astype(float)
    np.testing.assert_allclose(got, _minmax(colours @ LUMA), atol=1e-5)


# --- only chest radiographs: the reader's rule holds in ingest, predict and serve ------------------------------------

@pytest.mark.slow
def test_ingest_lists_a_ct_as_refused_and_does_not_cache_it(tmp_path, images, xray_source):
    (tmp_path / "src").mkdir()
    src = xray_source(tmp_path / "src", 4, seed=1)
    images.dicom(src / "ct.dcm", make.film(), Modality="CT")
    meta = pd.read_csv(src / "metadata.csv")
    pd.concat([meta, pd.DataFrame([{"path": "ct.dcm", "label": "covid"}])]).to_csv(src / "metadata.csv", index=False)
    data = tmp_path / "data"
    result = run_cli("ingest", str(src), "--out", str(data), "--size", "32", "--workers", "1")
    assert result.returncode == 1, result.stderr
    refused = json.loads((data / "ingest_report.json").read_text())["refused"]  # readable, but not a radiograph
    assert [(u["path"].endswith("ct.dcm"), u["reason"], u["kept"]) for u in refused] == [(True, CT_REASON, False)]
    manifest = pd.read_parquet(data / "manifest.parquet")
    assert len(manifest) == 4 and not manifest["path"].str.endswith("ct.dcm").any()


@pytest.mark.slow
def test_predict_refuses_a_ct_with_exit_1(tmp_path, images, tiny_run):
    ct = tmp_path / "ct.dcm"
    images.dicom(ct, make.film(), Modality="CT")
    result = run_cli("predict", str(tiny_run), str(ct))
    assert result.returncode == 1
    assert CT_REASON in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_service_answers_422_for_a_ct(tmp_path, images, predictor):
    from covidcxr.config import ServeConfig
    from covidcxr.deploy.serve.app import create_app

    ct = images.dicom(None, make.film(), Modality="CT")
    chest = images.dicom(None, np.rint(xray(np.random.default_rng(3), covid=False) * 4095))  # a film the gate knows
    with TestClient(create_app(predictor, ServeConfig(db=str(tmp_path / "log.sqlite")))) as client:
        refused = client.post("/api/predict", files={"file": ("ct.dcm", ct, "application/dicom")})
        scored = client.post("/api/predict", files={"file": ("chest.dcm", chest, "application/dicom")})
    assert refused.status_code == 422 and CT_REASON in refused.json()["detail"]
    assert scored.status_code == 200 and 0.0 <= scored.json()["probability"] <= 1.0
