"""to_square keeps what each mode promises; ImageCache grows in place and reads back what was written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from covidcxr.data.cache import CACHE_FILE, CACHE_META, MANIFEST_FILE, ImageCache, to_square
from covidcxr.data.square import to_square_np
from covidcxr.errors import InputError


def _landscape() -> np.ndarray:
    """200 wide x 100 high, white, with a black 10-px frame column at each side and a gray stripe in the middle."""
    img = np.ones((100, 200), np.float32)
    img[:, :10] = img[:, -10:] = 0.0
    img[:, 95:105] = 0.5
    return img


def test_pad_keeps_the_whole_image_with_black_borders_of_the_right_width():
    out = to_square(_landscape(), 100, "pad")
    assert out.shape == (100, 100) and out.dtype == np.uint8
    # the 200x100 image shrinks to 100x50 and sits in the middle: 25 black rows above and below
    # (Lanczos rings by a grey level or so next to an edge, and blurs the one row on it)
    assert out[:24].max() <= 2 and out[-24:].max() <= 2
    assert (out[25, 10:45] > 200).all() and (out[74, 10:45] > 200).all()
    body = out[26:74]
    assert (body[:, 10:45] > 240).all() and (body[:, 55:90] > 240).all()
    assert (body[:, :4] < 15).all() and (body[:, -4:] < 15).all()  # the image's own side frames are still there
    assert (abs(body[:, 49:51].astype(int) - 128) < 10).all()  # and the centre stripe stays in the centre


def test_pad_of_a_portrait_image_pads_left_and_right():
    out = to_square(np.ones((90, 30), np.float32), 90, "pad")
    assert (out[:, :29] == 0).all() and (out[:, 61:] == 0).all() and (out[:, 31:59] == 255).all()


def test_crop_takes_the_centre_square():
    img = _landscape()
    img[:, 50:150] = 0.25  # the centre 100x100 square is uniform gray; everything outside it is not
    out = to_square(img, 50, "crop")
    assert out.shape == (50, 50)
    assert (abs(out.astype(int) - 64) <= 1).all()


def test_squash_fills_the_square_without_borders():
    out = to_square(_landscape(), 100, "squash")
    assert (out[:, 10:40] > 240).all()  # white reaches top and bottom: no padding
    assert (out[:, :3] < 15).all() and (out[:, -3:] < 15).all()  # side frames squeezed to 5 px
    assert (abs(out[:, 49:51].astype(int) - 128) < 10).all()


def test_square_input_is_only_resized_in_every_mode():
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    outs = [to_square(img, 64, mode) for mode in ("pad", "squash", "crop")]
    for out in outs:
        np.testing.assert_array_equal(out, np.rint(img * 255).astype(np.uint8))


def test_unknown_square_mode():
    with pytest.raises(ValueError, match="unknown square mode 'stretch'"):
        to_square(_landscape(), 10, "stretch")


def _cache_with(tmp_path, n: int, size: int = 8) -> tuple[ImageCache, np.ndarray]:
    cache = ImageCache(tmp_path, size=size, mode="r+")
    cache.reserve(n)
    rows = np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)
    for i, row in enumerate(rows):
        cache.write(i, row)
    cache.flush()
    return cache, rows


def test_reserve_grows_without_losing_rows(tmp_path):
    cache, rows = _cache_with(tmp_path, 3)
    cache.reserve(10)
    assert (tmp_path / CACHE_FILE).stat().st_size == 10 * 8 * 8
    np.testing.assert_array_equal(cache.array[:3], rows)
    assert not cache.array[3:].any()
    cache.write(9, np.full((8, 8), 7, np.uint8))
    cache.reserve(5)  # never shrinks
    cache.flush()
    reopened = ImageCache(tmp_path)
    assert reopened.capacity == 10 and json.loads((tmp_path / CACHE_META).read_text())["capacity"] == 10
    np.testing.assert_array_equal(reopened.array[:3], rows)
    assert (reopened.array[9] == 7).all()


def test_reopening_with_another_size_or_square_mode_is_refused(tmp_path):
    _cache_with(tmp_path, 2)
    with pytest.raises(ValueError, match="size=8, asked for 16"):
        ImageCache(tmp_path, size=16)
    with pytest.raises(ValueError, match="square=pad, asked for crop"):
        ImageCache(tmp_path, size=8, square="crop")


def test_not_an_ingested_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run covidcxr ingest first"):
        ImageCache(tmp_path)


def test_load_returns_the_written_rows(tmp_path):
    cache, rows = _cache_with(tmp_path, 6)
    batch = ImageCache(tmp_path).load([4, 1, 4])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 8, 8)
    np.testing.assert_array_equal(batch.numpy(), rows[[4, 1, 4]])


def test_manifest_leaves_out_duplicates_unless_asked(tmp_path):
    _cache_with(tmp_path, 2)
    pd.DataFrame({"path": ["/a", "/b"], "duplicate_of": ["", "/a"]}).to_parquet(tmp_path / MANIFEST_FILE)
    cache = ImageCache(tmp_path)
    assert cache.manifest()["path"].tolist() == ["/a"]
    assert len(cache.manifest(include_duplicates=True)) == 2


@pytest.mark.parametrize("mode", ["pad", "crop", "squash"])
@pytest.mark.parametrize("size", [64, 256])
def test_numpy_square_is_torchs_on_xrays_of_odd_sizes(mode, size, images):
    """The service without torch makes the cache square `ingest` stores (data/square.py): the same, but for a float32
    tie broken the other way in a few pixels per hundred thousand, one gray level apart."""
    for seed, (h, w) in enumerate([(96, 80), (300, 211), (57, 133), (512, 512), (640, 480)]):
        img = images.smooth(seed, h, w)
        diff = np.abs(to_square_np(img, size, mode).astype(int) - to_square(img, size, mode))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, f"{h}x{w}: {(diff > 0).sum()} pixels differ"


def test_numpy_square_is_torchs_on_real_xrays(shared_cxr):
    """Real X-rays: every pixel the same (0 of 400 differed when this was written)."""
    from covidcxr.data.reader import read_image

    paths = sorted((shared_cxr / "images").rglob("*.png"))[::40][:60]
    for path in paths:
        img = read_image(path)
        np.testing.assert_array_equal(to_square_np(img, 256), to_square(img, 256), err_msg=str(path))
    with pytest.raises(InputError, match="unknown square mode"):
        to_square_np(np.zeros((8, 8), np.float32), 8, "stretch")
