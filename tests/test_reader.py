"""read_image: every format and colour mode becomes the same 2-D float32 gray in [0, 1]; bad files fail clearly."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from covidcxr.data import reader
from covidcxr.data.reader import ImageReadError, ImageRefused, read_image

LUMA = np.array([0.299, 0.587, 0.114])


def _gray_ok(img: np.ndarray) -> None:
    assert img.ndim == 2 and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_lossless_8bit_gray_is_exact(tmp_path, images, suffix):
    u8 = images.to_u8(images.smooth(1, 40, 30))
    got = read_image(images.save(tmp_path / f"a{suffix}", u8 / 255.0))
    _gray_ok(got)
    np.testing.assert_array_equal(got, u8.astype(np.float32) / 255.0)


def test_16bit_png_is_scaled_by_its_own_range(tmp_path):
    raw = np.linspace(1000, 3000, 48 * 32).reshape(48, 32).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(raw).save(path)
    assert path.read_bytes()[24] == 16  # IHDR bit depth: really a 16-bit PNG
    got = read_image(path)
    _gray_ok(got)
    np.testing.assert_allclose(got, (raw - 1000.0) / 2000.0, atol=1e-6)


def test_16bit_blank_image_is_an_error(tmp_path):
    path = tmp_path / "blank16.png"
    Image.fromarray(np.full((8, 8), 700, np.uint16)).save(path)
    with pytest.raises(ImageReadError, match="blank"):
        read_image(path)


def test_jpeg_decodes_close_to_the_original(tmp_path, images):
    img = images.smooth(2, 64, 48)
    got = read_image(images.save(tmp_path / "a.jpg", img, quality=95))
    _gray_ok(got)
    assert got.shape == (64, 48)
    assert np.abs(got - img).mean() < 0.01


def test_rgb_becomes_itu601_luminance(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (5, 4), (200, 100, 50)).save(path)
    got = read_image(path)
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got, (LUMA @ [200, 100, 50]) / 255.0, atol=1e-6)


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, :] = (255, 255, 255, 128)  # half-transparent white -> half grey
    rgba[1, :] = (30, 200, 90, 0)  # fully transparent colour -> black
    rgba[1, 2] = (30, 200, 90, 255)  # opaque colour -> its luminance
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    got = read_image(path)
    np.testing.assert_allclose(got[0], 128 / 255.0, atol=1e-6)
    np.testing.assert_allclose(got[1, :2], 0.0, atol=1e-6)
    assert got[1, 2] == pytest.approx((LUMA @ [30, 200, 90]) / 255.0, abs=1e-6)


def test_palette_png_uses_the_palette_colours(tmp_path):
    pal_img = Image.new("P", (4, 2))
    pal_img.putpalette([0, 0, 0, 255, 0, 0, 10, 20, 250] + [0] * (256 * 3 - 9))
    pal_img.putdata([0, 1, 2, 1, 2, 2, 1, 0])
    path = tmp_path / "pal.png"
    pal_img.save(path)
    got = read_image(path)
    expected = np.array([0.0, LUMA @ [255, 0, 0], LUMA @ [10, 20, 250]]) / 255.0
    np.testing.assert_allclose(got.ravel(), expected[[0, 1, 2, 1, 2, 2, 1, 0]], atol=1e-6)


def test_palette_transparency_is_composited_on_black(tmp_path):
    pal_img = Image.new("P", (2, 1))
    pal_img.putpalette([255, 255, 255] * 256)
    pal_img.putdata([0, 1])
    path = tmp_path / "pal_t.png"
    pal_img.save(path, transparency=0)  # index 0 fully transparent
    np.testing.assert_allclose(read_image(path).ravel(), [0.0, 1.0], atol=1e-6)


def test_exif_orientation_is_honoured(tmp_path):
    stored = np.zeros((20, 40), np.uint8)  # landscape as stored; bright block in the stored top-left corner
    stored[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored, mode="L").save(path, exif=exif, quality=95)
    got = read_image(path)
    assert got.shape == (40, 20)  # portrait once displayed
    assert got[:8, -8:].mean() > 0.9  # stored top-left ends up top-right after a clockwise quarter turn
    assert got[:8, :8].mean() < 0.1 and got[-8:, :].mean() < 0.1


def _dicom_ramp() -> np.ndarray:
    return np.linspace(0, 4095, 16 * 12).reshape(16, 12).round().astype(np.uint16)


def test_dicom_monochrome2_uses_its_own_range(tmp_path, images):
    raw = (_dicom_ramp() // 2 + 500).astype(np.uint16)
    path = tmp_path / "m2.dcm"
    images.dicom(path, raw)
    got = read_image(path)
    _gray_ok(got)
    np.testing.assert_allclose(got, (raw - raw.min()) / float(raw.max() - raw.min()), atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path, images):
    raw = _dicom_ramp()
    m2 = read_image(images.dicom(None, raw), "a.dcm")
    m1 = read_image(images.dicom(None, raw, photometric="MONOCHROME1"), "b.dcm")
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == pytest.approx(1.0) and m1[-1, -1] == pytest.approx(0.0)  # low values are white in MONOCHROME1


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 'LINEAR' window onto [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def test_dicom_window_is_applied(tmp_path, images):
    raw = _dicom_ramp()
    got = read_image(images.dicom(None, raw, WindowCenter=2000, WindowWidth=1001), "w.dcm")
    np.testing.assert_allclose(got, _linear_window(raw.astype(float), 2000, 1001), atol=1e-6)
    assert (got == 0).sum() > 10 and (got == 1).sum() > 10  # clipped on both sides


def test_dicom_window_is_not_stretched_to_the_image_range(images):
    """Pixels all inside the window keep the window's grey levels (the window is the display the file asks for)."""
    raw = np.linspace(1800, 2300, 64).reshape(8, 8).round().astype(np.uint16)
    got = read_image(images.dicom(None, raw, WindowCenter=2048, WindowWidth=1000), "w.dcm")
    np.testing.assert_allclose(got, _linear_window(raw.astype(float), 2048, 1000), atol=1e-6)
    assert 0.2 < got.min() < got.max() < 0.8


def test_dicom_rescale_slope_intercept_comes_before_the_window(images):
    raw = _dicom_ramp()
    hu = raw * 2.0 - 1000.0  # the window is given in rescaled units
    dcm = images.dicom(None, raw, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2001)
    got = read_image(dcm, "r.dcm")
    expected = _linear_window(hu, 3000, 2001)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, _linear_window(raw.astype(float), 3000, 2001))  # the rescale mattered


def test_dicom_voi_lut_table_is_applied(images):
    raw = np.linspace(1000, 3000, 64).reshape(8, 8).round().astype(np.uint16)
    table = np.round(np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16)  # a non-linear display curve
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4096, 0, 12], table.tolist()
    item["LUTDescriptor"].VR = item["LUTData"].VR = "US"
    got = read_image(images.dicom(None, raw, VOILUTSequence=Sequence([item])), "lut.dcm")
    np.testing.assert_allclose(got, table[raw] / 4095.0, atol=1e-6)


def test_dicom_bad_window_is_an_image_read_error(images):
    with pytest.raises(ImageReadError, match="window"):
        read_image(images.dicom(None, _dicom_ramp(), WindowCenter=100, WindowWidth=0), "bad.dcm")


def test_dicom_without_pixel_data(tmp_path, images):
    path = tmp_path / "nopix.dcm"
    images.dicom(path, None)
    with pytest.raises(ImageReadError, match="no pixel data") as err:
        read_image(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("make, reason", [
    (lambda p, im: p.write_bytes(b""), "empty file"),
    (lambda p, im: im.truncated_png(p, im.smooth(3, 200, 200)), "truncated or corrupt"),
    (lambda p, im: p.write_text("this is not an image\n"), "not an image"),
])
def test_broken_files_fail_with_a_reason(tmp_path, images, make, reason):
    path = tmp_path / "broken.png"
    make(path, images)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert reason in err.value.reason
    assert err.value.path == str(path) and str(err.value).startswith(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_pixel_limit_guards_against_decompression_bombs(tmp_path, images, monkeypatch):
    path = images.save(tmp_path / "a.png", images.smooth(4, 20, 20))
    dcm = images.dicom(None, _dicom_ramp())
    assert read_image(path).shape == (20, 20) and read_image(dcm, "a.dcm").shape == (16, 12)
    monkeypatch.setattr(reader, "MAX_PIXELS", 16 * 12 - 1)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(dcm, "a.dcm")


def test_huge_header_is_refused_before_decoding(images):
    """A 400-megapixel header (Pillow's own bomb guard fires first) is still an ImageReadError."""
    with pytest.raises(ImageReadError, match="too large"):
        read_image(images.png_claiming_size(20_000, 20_000), "bomb.png")


def test_bytes_input_matches_path_input(tmp_path, images):
    path = images.save(tmp_path / "a.png", images.smooth(5))
    np.testing.assert_array_equal(read_image(path.read_bytes()), read_image(path))
    buf = io.BytesIO()
    Image.new("RGB", (3, 3), (0, 255, 0)).save(buf, format="JPEG")
    assert read_image(buf.getvalue()).shape == (3, 3)
    with pytest.raises(ImageReadError, match="upload.png: not an image"):
        read_image(b"hello", "upload.png")


@pytest.mark.realdata
def test_every_fullres_file_reads_like_its_processed_copy(shared_cxr):
    """Real files in every format/mode: 2-D float in [0, 1], original size, and the same picture as the processed copy.

    The processed copies were made with the decoding rules the reader implements (EXIF, alpha on black, luma), so a
    resized read must match them closely: this checks orientation, colour handling and aspect ratio on real files.
    """
    root = shared_cxr / "fullres"
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    assert len(meta) > 20
    for row in meta.itertuples():
        img = read_image(root / row.path)
        _gray_ok(img)
        assert img.shape == (int(row.orig_height), int(row.orig_width)), row.path
        if not row.processed_path:  # the DICOM has no processed copy
            continue
        proc = Image.open(root / row.processed_path).convert("L")
        assert abs(img.shape[1] / img.shape[0] - proc.width / proc.height) < 0.01, row.path
        ours = Image.fromarray((img * 255).round().astype(np.uint8)).resize(proc.size, Image.LANCZOS)
        diff = np.abs(np.asarray(ours, np.float32) - np.asarray(proc, np.float32)).mean() / 255.0
        assert diff < 0.01, f"{row.path}: mean difference {diff:.3f} from its processed copy"


@pytest.mark.parametrize("tags, reason", [
    ({"Modality": "CT"}, "not a chest radiograph: Modality CT"),
    ({"Modality": "MR"}, "not a chest radiograph: Modality MR"),
    ({"BodyPartExamined": "KNEE"}, "not a chest radiograph: BodyPartExamined KNEE"),
    ({"ViewPosition": "LL"}, "a lateral view (ViewPosition LL): only frontal chest radiographs are scored"),
    ({"ViewPosition": "RL"}, "a lateral view (ViewPosition RL): only frontal chest radiographs are scored"),
    ({"ViewPosition": "LATERAL"}, "a lateral view (ViewPosition LATERAL): only frontal chest radiographs are scored"),
])
def test_dicom_that_is_not_a_frontal_chest_radiograph_is_refused(images, tags, reason):
    with pytest.raises(ImageRefused) as err:  # refused (counted by reason), not unreadable
        read_image(images.dicom(None, _dicom_ramp(), **tags), "other.dcm")
    assert err.value.reason == reason


@pytest.mark.parametrize("tags", [
    {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA"},
    {"Modality": "DR", "ViewPosition": "AP"},
    {"Modality": "CR", "BodyPartExamined": "", "ViewPosition": "LLD"},  # decubitus films are frontal
])
def test_frontal_chest_radiographs_are_read(images, tags):
    assert read_image(images.dicom(None, _dicom_ramp(), **tags), "chest.dcm").shape == (16, 12)


def test_dicom_without_modality_is_read(images):
    """Older files leave Modality out: they are accepted."""
    ds = pydicom.dcmread(io.BytesIO(images.dicom(None, _dicom_ramp())))
    del ds.Modality
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    assert read_image(buf.getvalue(), "old.dcm").shape == (16, 12)


def test_multi_frame_dicom_is_refused_with_a_reason(images):
    frames = np.stack([_dicom_ramp(), _dicom_ramp()[::-1]])
    data = images.dicom(None, None, Rows=16, Columns=12, NumberOfFrames=2, PixelData=frames.tobytes())
    with pytest.raises(ImageReadError, match=r"multi-frame DICOM \(2 frames\): send each film as its own file"):
        read_image(data, "cine.dcm")


def test_read_errors_are_one_line(images):
    """A decoder's multi-line message is folded into the one line that reports and logs show."""
    ds = pydicom.dcmread(io.BytesIO(images.dicom(None, _dicom_ramp())))
    ds.PixelData = ds.PixelData[:-10]  # too short for 16 x 12 pixels: pydicom cannot decode it
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="cannot decode DICOM pixels") as err:
        read_image(buf.getvalue(), "short.dcm")
    assert "\n" not in str(err.value)
    assert ImageReadError("a.dcm", "first\nsecond  line").reason == "first second line"
