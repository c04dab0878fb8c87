"""Examples of what the gate must refuse, found or made on this machine (nothing is downloaded):

- photographs: the sample images that scikit-image, scikit-learn and matplotlib ship, as random crops;
- screenshots: a film pasted small into a page of window chrome and text (made from the frontal films at fit time);
- documents: pages of text, tables and rules rendered with Pillow's own font;
- other modalities: the phantom and MR slice the packages ship; CT slices when a folder of them is given;
- blank, uniform and noise images, made here;
- lateral films and CT slices from a folder the user gives (`--gate-negatives`), e.g. ../shared/cxr-nonfrontal:
  no Python package ships them, so a gate fitted without such a folder records that it was not shown any.

Rotated and inverted films are transforms of the run's own frontal films, made in the fitting loop.
Every pool is a (N, G, G) float32 array of thumbnails in [0, 1] (`thumbnail`).
"""

from __future__ import annotations

import gzip
import logging
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from covidcxr.errors import ImageReadError

log = logging.getLogger(__name__)

THUMB = 48  # the gate's input side: enough for orientation, view and kind, at a fraction of a millisecond per image
# where a folder's images go, by the name of their kind (metadata.csv `kind` column, or the sub-folder's name)
FOLDER_KINDS = {"lateral": "lateral", "ct": "other_modality", "mr": "other_modality", "mri": "other_modality",
                "other_modality": "other_modality", "photo": "photograph", "photograph": "photograph",
                "screenshot": "photograph", "document": "document", "blank": "blank_or_noise",
                "noise": "blank_or_noise"}
_OTHER_MODALITY_FILES = {"phantom.png", "s1045.ima.gz"}
_DOCUMENT_FILES = {"page.png", "text.png"}


def thumbnail(image: np.ndarray, size: int = THUMB) -> np.ndarray:
    """A 2-D image (uint8, or float in [0, 1]) -> its (size, size) float32 thumbnail in [0, 1], squashed to a square
    by area averaging: the same function turns cache squares and negatives into the gate's input."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


def package_files() -> list[Path]:
    """Sample images shipped inside installed packages (each one optional)."""
    found: list[Path] = []
    for module, sub, patterns in (("skimage.data", "", ("*.png", "*.jpg", "lfw_subset.npy")),
                                  ("sklearn.datasets", "images", ("*.jpg",)),
                                  ("matplotlib", "mpl-data/sample_data", ("*.png", "*.jpg", "*.ima.gz"))):
        try:
            folder = Path(str(files(module))) / sub
        except ModuleNotFoundError:
            log.debug("gate negatives: %s is not installed", module)
            continue
        found += sorted(p for pattern in patterns for p in folder.glob(pattern))
    return found


def read_package_image(path: Path) -> np.ndarray:
    """One shipped sample image as 2-D float in [0, 1] (matplotlib's MR slice is raw 16-bit, 256 x 256)."""
    if path.name.endswith(".ima.gz"):
        raw = np.frombuffer(gzip.decompress(path.read_bytes()), dtype="<u2").reshape(256, 256).astype(np.float32)
        return raw / max(float(raw.max()), 1.0)
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255


def random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random square-ish crops of a third of the image up to all of it, as thumbnails."""
    h, w = image.shape
    out = []
    for _ in range(count):
        side = int(rng.integers(max(8, min(h, w) // 3), min(h, w) + 1))
        ch, cw = side, min(w, int(side * rng.uniform(0.75, 1.33)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(thumbnail(image[y:y + ch, x:x + cw]))
    return out


def package_pools(rng: np.random.Generator, crops: int = 30,
                  files: list[Path] | None = None) -> dict[str, list[np.ndarray]]:
    """Photographs, documents and other modalities from the packages' sample images (all of them, or `files`), plus
    skimage's faces."""
    pools: dict[str, list[np.ndarray]] = {"photograph": [], "document": [], "other_modality": []}
    for path in package_files() if files is None else files:
        kind = ("other_modality" if path.name in _OTHER_MODALITY_FILES
                else "document" if path.name in _DOCUMENT_FILES else "photograph")
        try:
            if path.suffix == ".npy":  # scikit-image's stack of 25 x 25 faces
                pools[kind] += [thumbnail(face) for face in np.load(path)[::2]]
            else:
                pools[kind] += random_crops(read_package_image(path), crops, rng)
        except (OSError, ValueError) as e:
            log.debug("gate negatives: skipped %s (%s)", path, e)
    return pools


def _words(rng: np.random.Generator, count: int) -> str:
    return " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(1, 10))))
                    for _ in range(count))


def document(rng: np.random.Generator) -> np.ndarray:
    """A rendered page: lines of text in one or two columns, sometimes a table's rules, on paper or a dark screen."""
    w, h = int(rng.integers(300, 800)), int(rng.integers(300, 1000))
    paper = int(rng.integers(190, 256))
    im = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=int(rng.integers(9, 30)))
    ink = int(rng.integers(0, 90))
    columns = 1 if rng.random() < 0.7 else 2
    y = int(rng.integers(5, 60))
    while y < h:
        for c in range(columns):
            x = 10 + c * w // columns + int(rng.integers(0, 30))
            draw.text((x, y), _words(rng, int(rng.integers(2, 10))), fill=ink, font=font)
        if rng.random() < 0.15:
            draw.line((5, y - 3, w - 5, y - 3), fill=ink, width=int(rng.integers(1, 3)))
        y += int(rng.integers(12, 45))
    page = np.asarray(im, dtype=np.float32) / 255
    return thumbnail(1 - page if rng.random() < 0.2 else page)


def blank_or_noise(rng: np.random.Generator, size: int = THUMB) -> np.ndarray:
    """A blank, uniform, gradient or noise image (white, Gaussian, salt-and-pepper or smooth blotches)."""
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return np.full((size, size), rng.random(), np.float32)
    if kind == 1:
        ramp = np.linspace(rng.random(), rng.random(), size, dtype=np.float32)
        return np.ascontiguousarray(np.outer(ramp, np.ones(size)) if rng.random() < 0.5
                                    else np.outer(np.ones(size), ramp), dtype=np.float32)
    if kind == 2:
        return rng.random((size, size), dtype=np.float32)
    if kind == 3:
        return np.clip(rng.normal(rng.random(), rng.uniform(0.05, 0.3), (size, size)), 0, 1).astype(np.float32)
    if kind == 4:
        return (rng.random((size, size)) < rng.uniform(0.05, 0.95)).astype(np.float32)
    coarse = rng.random((int(rng.integers(2, 12)),) * 2).astype(np.float32)
    blotches = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return thumbnail(np.asarray(blotches))


def screenshot(film: np.ndarray, rng: np.random.Generator, size: int = THUMB) -> np.ndarray:
    """A film thumbnail shown small in a window: bars of chrome and lines of text around it."""
    canvas = Image.new("L", (4 * size, 4 * size), int(rng.integers(150, 256)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):  # tool bars and side panels
        y = int(rng.integers(0, 4 * size))
        draw.rectangle((0, y, 4 * size, y + int(rng.integers(6, 24))), fill=int(rng.integers(40, 230)))
    font = ImageFont.load_default(size=int(rng.integers(8, 16)))
    for _ in range(int(rng.integers(3, 12))):
        draw.text((int(rng.integers(0, 3 * size)), int(rng.integers(0, 4 * size))), _words(rng, 3), fill=0, font=font)
    side = int(rng.integers(int(1.2 * size), int(2.6 * size)))
    shown = Image.fromarray((film * 255).astype(np.uint8)).resize((side, side))
    canvas.paste(shown, (int(rng.integers(0, 4 * size - side)), int(rng.integers(0, 4 * size - side))))
    return thumbnail(np.asarray(canvas))


def folder_pools(folder: str | Path, crops: int = 8, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Thumbnails (whole image plus random crops) from a folder of refusable images: its metadata.csv's `kind`
    column names each image's kind (as ../shared/cxr-nonfrontal's does), else each sub-folder's name does."""
    # imported here: the DICOM decoders are needed only for a folder of negatives, not by every process that trains
    from covidcxr.data.reader import read_image
    from covidcxr.data.sources import image_files

    folder, rng = Path(folder), np.random.default_rng(seed)
    table = folder / "metadata.csv"
    if table.is_file():
        meta = pd.read_csv(table)
        if not {"path", "kind"} <= set(meta.columns):
            raise ValueError(f"{table}: needs the columns path and kind")
        items = [(folder / p, str(k).lower()) for p, k in zip(meta["path"], meta["kind"])]
    else:
        items = [(p, p.relative_to(folder).parts[0].lower()) for p in image_files(folder) if p.parent != folder]
    pools: dict[str, list[np.ndarray]] = {}
    for path, kind in items:
        if kind not in FOLDER_KINDS:
            raise ValueError(f"{path}: kind {kind!r} is not one of {', '.join(sorted(FOLDER_KINDS))}")
        try:
            image = read_image(path)
        except ImageReadError as e:
            log.warning("gate negatives: %s: %s", path, e.reason)
            continue
        pools.setdefault(FOLDER_KINDS[kind], []).extend([thumbnail(image)] + random_crops(image, crops, rng))
    return pools
