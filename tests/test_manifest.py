"""Duplicate detection: byte copies and resized copies are found, look-alikes with other labels need a stricter bar."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr.data import manifest
from covidcxr.data.manifest import THUMB, content_hash, find_duplicates, manifest_hash, perceptual_hash, thumbnail


def _row(name: str, img: np.ndarray, label: str = "covid", sha1: str | None = None) -> dict:
    return {"path": name, "label": label, "sha1": sha1 or hashlib.sha1(img.tobytes()).hexdigest(),
            "thumb": thumbnail(img)}


def _resized(img: np.ndarray, width: int, height: int) -> np.ndarray:
    pil = Image.fromarray(np.rint(img * 255).astype(np.uint8), mode="L").resize((width, height), Image.LANCZOS)
    return np.asarray(pil, np.float32) / 255.0


def _with_correlation(base: np.ndarray, target: float, seed: int) -> np.ndarray:
    """A thumbnail-sized image whose mean-removed correlation with `base` is close to `target`."""
    b = base - base.mean()
    noise = np.random.default_rng(seed).normal(size=base.shape)
    noise -= noise.mean() + (noise * b).sum() / (b * b).sum() * b  # orthogonal to base
    noise *= np.linalg.norm(b) / np.linalg.norm(noise) * np.sqrt(1 / target**2 - 1)
    return np.clip(base + noise, 0, 1)


def _thumb_corr(a: dict, b: dict) -> float:
    x, y = (np.frombuffer(r["thumb"], np.uint8).astype(float) for r in (a, b))
    return float(np.corrcoef(x, y)[0, 1])


def test_content_hash_is_sha1_of_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"chest")
    assert content_hash(path) == hashlib.sha1(b"chest").hexdigest()


def test_thumbnail_ignores_aspect_ratio(images):
    img = images.smooth(1, 120, 90)
    assert len(thumbnail(img)) == THUMB * THUMB
    squashed = {"thumb": thumbnail(_resized(img, 200, 100))}
    assert _thumb_corr({"thumb": thumbnail(img)}, squashed) > 0.98


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_perceptual_hash_survives_resizing_but_not_another_image(images):
    img = images.smooth(1, 120, 90)
    h = perceptual_hash(img)
    assert len(h) == 16
    assert _hamming(h, perceptual_hash(_resized(img, 64, 64))) <= 6
    assert _hamming(h, perceptual_hash(images.smooth(2, 120, 90))) > 12


def test_byte_copy_and_squashed_copy_are_found_other_image_is_not(images):
    a, other = images.smooth(1, 120, 90), images.smooth(2, 120, 90)
    rows = [_row("a", a), _row("a_copy", a, sha1=_row("a", a)["sha1"]),
            _row("a_squashed", _resized(a, 64, 64)), _row("other", other)]
    dups = find_duplicates(pd.DataFrame(rows)).set_index("path")
    assert sorted(dups.index) == ["a_copy", "a_squashed"]
    assert (dups["duplicate_of"] == "a").all()
    assert dups.at["a_copy", "correlation"] == 1.0
    assert not dups["label_conflict"].any()


def test_byte_copy_is_found_even_when_thumbnails_are_flat():
    """A blank image has no correlation with anything; the same bytes still make it a copy."""
    flat = np.full((40, 40), 0.5, np.float32)
    rows = [_row("a", flat), _row("b", flat)]
    dups = find_duplicates(pd.DataFrame(rows))
    assert dups["path"].tolist() == ["b"] and dups["duplicate_of"].tolist() == ["a"]


@pytest.fixture
def between_the_bars(images) -> tuple[dict, dict, dict]:
    """A base image, a copy correlating between 0.95 and 0.975, and one above 0.975 (thumbnail correlation)."""
    base = images.smooth(7, THUMB, THUMB)
    mid, high = _with_correlation(base, 0.962, 1), _with_correlation(base, 0.99, 2)
    rows = _row("base", base, "covid"), _row("mid", mid), _row("high", high)
    assert 0.952 < _thumb_corr(rows[0], rows[1]) < 0.973 and _thumb_corr(rows[0], rows[2]) > 0.98
    return rows


def test_same_label_copy_between_the_bars_is_a_duplicate(between_the_bars):
    base, mid, _ = between_the_bars
    dups = find_duplicates(pd.DataFrame([base, {**mid, "label": "covid"}]))
    assert dups["path"].tolist() == ["mid"]
    assert 0.95 <= dups["correlation"].iloc[0] < 0.975


def test_label_conflict_needs_the_stricter_bar(between_the_bars):
    base, mid, high = between_the_bars
    df = pd.DataFrame([base, {**mid, "label": "normal"}, {**high, "label": "normal"}])
    dups = find_duplicates(df).set_index("path")
    assert list(dups.index) == ["high"]  # 'mid' is a look-alike with another label, not a copy
    assert dups.at["high", "label_conflict"] and dups.at["high", "kept_label"] == "covid"
    assert find_duplicates(df, other_label=0.95).set_index("path").loc["mid", "label_conflict"]


def test_matching_is_not_transitive(images):
    """a~b and b~c but not a~c: b is a copy of a, and c stays (it only resembles a dropped image)."""
    a = images.smooth(3, THUMB, THUMB)
    b = _with_correlation(a, 0.97, 1)
    c = _with_correlation(b, 0.97, 2)
    rows = [_row("a", a), _row("b", b), _row("c", c)]
    assert _thumb_corr(rows[0], rows[1]) >= 0.95 and _thumb_corr(rows[1], rows[2]) >= 0.95
    assert _thumb_corr(rows[0], rows[2]) < 0.95
    dups = find_duplicates(pd.DataFrame(rows))
    assert dups["path"].tolist() == ["b"]


def test_order_decides_which_copy_is_kept(images):
    big = images.smooth(4, 200, 160)
    rows = [_row("big", big), _row("small", _resized(big, 80, 64))]
    assert find_duplicates(pd.DataFrame(rows))["path"].tolist() == ["small"]
    assert find_duplicates(pd.DataFrame(rows[::-1]))["path"].tolist() == ["big"]


def test_many_rows_span_several_chunks(images, monkeypatch):
    """Copies are found across (and inside) the chunks of the pairwise product, each against its original."""
    monkeypatch.setattr(manifest, "_candidate_pairs", functools.partial(manifest._candidate_pairs, chunk=7))
    uniques = [images.smooth(100 + i, 48, 40) for i in range(30)]
    rows = [_row(f"u{i}", img) for i, img in enumerate(uniques)]
    rows += [_row(f"c{i}", _resized(uniques[i], 32, 32)) for i in (0, 13, 29)]
    dups = find_duplicates(pd.DataFrame(rows)).set_index("path")
    assert dict(dups["duplicate_of"]) == {"c0": "u0", "c13": "u13", "c29": "u29"}


def test_empty_frame_has_no_duplicates():
    empty = pd.DataFrame(columns=["path", "label", "sha1", "thumb"])
    assert find_duplicates(empty).empty


def test_manifest_hash_depends_on_content_and_labels_not_on_row_order():
    df = pd.DataFrame({"sha1": ["a", "b"], "label": ["covid", "normal"], "patient_id": ["p1", "p2"],
                       "source": ["s", "s"], "path": ["/x", "/y"]})
    assert manifest_hash(df) == manifest_hash(df.iloc[::-1])
    assert manifest_hash(df) == manifest_hash(df.assign(path=["/moved/x", "/moved/y"]))
    assert manifest_hash(df) != manifest_hash(df.assign(label=["covid", "covid"]))
