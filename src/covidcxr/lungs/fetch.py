"""Fetching the hand-drawn lung masks a lung model learns from, and pairing them with their X-rays.

The masks are the hand-drawn lung masks (V7 Labs annotations of images of the Cohen COVID-19 collection) that
torchxrayvision ships inside its wheel as data/semantic_masks_v7labs_lungs.zip. The wheel is fetched with pip, so
the package index the user has configured (or a local folder) is used, and nothing of it is installed. Each mask
is a binary 0/255 gray image of the same size as the original X-ray, named like the original file.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from covidcxr.data.download import DownloadError
from covidcxr.errors import InputError, MissingInputError

WHEEL = "torchxrayvision==1.5.7"
MASKS_ZIP = "torchxrayvision/data/semantic_masks_v7labs_lungs.zip"
MASK_FOLDER = "semantic_masks_v7labs_lungs"  # the folder inside MASKS_ZIP, and the one made under dest


def fetch_masks(dest: Path, find_links: str | None = None) -> Path:
    """Extract the hand-drawn lung masks from torchxrayvision's wheel into dest/semantic_masks_v7labs_lungs/ and
    return that folder; skipped when it already holds files. find_links: a folder holding the wheel (pip then
    runs with --no-index). Raises DownloadError (one line) when pip fails or the wheel lacks the masks."""
    dest = Path(dest)
    masks = dest / MASK_FOLDER
    if masks.is_dir() and any(masks.iterdir()):
        return masks
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".lung-masks-") as tmp:
        with zipfile.ZipFile(io.BytesIO(_masks_zip(_pip_download(Path(tmp), find_links)))) as zf:
            names = [n for n in zf.namelist() if n.startswith(MASK_FOLDER + "/") and not n.endswith("/")]
            if not names:
                raise DownloadError(f"{MASKS_ZIP} in the {WHEEL} wheel holds no {MASK_FOLDER}/ files")
            zf.extractall(tmp, members=names)  # extractall drops absolute and '..' parts of member names
        os.replace(Path(tmp) / MASK_FOLDER, masks)  # all or nothing: no half-extracted folder is left behind
    return masks


def _pip_download(folder: Path, find_links: str | None) -> Path:
    """The torchxrayvision wheel, downloaded by pip (without its dependencies) into folder."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           WHEEL, "-d", str(folder)]
    if find_links:
        cmd += ["--no-index", "--find-links", str(find_links)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise DownloadError(f"pip download {WHEEL} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    wheels = sorted(folder.glob("torchxrayvision-*.whl"))
    if not wheels:
        raise DownloadError(f"pip download {WHEEL} succeeded but left no torchxrayvision wheel in {folder}")
    return wheels[0]


def _masks_zip(wheel: Path) -> bytes:
    """The bytes of the masks zip inside the wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(MASKS_ZIP)
    except KeyError:
        raise DownloadError(f"{wheel.name} has no member {MASKS_ZIP}") from None
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{wheel.name} is not a valid wheel ({exc})") from None


def paired_images(data: Path, mask_dir: Path) -> pd.DataFrame:
    """(image, mask) paths, plus patient_id when the metadata has it, for the images of a raw data folder in the
    generic CSV layout that have a mask. A mask is named like the original file in the source repository, so it is
    matched to the basename of `origin_path` (or of `path` when the CSV has no origin_path)."""
    data, mask_dir = Path(data), Path(mask_dir)
    csv = data / "metadata.csv"
    if not csv.is_file():
        raise MissingInputError(f"{csv} not found: expected a raw data folder with a metadata.csv (column path)")
    if not mask_dir.is_dir():
        raise MissingInputError(f"mask folder {mask_dir} not found (covidcxr lungs fetch prints it)")
    meta = pd.read_csv(csv, dtype=str)
    key = "origin_path" if "origin_path" in meta.columns else "path"
    masks = {p.name: p for p in mask_dir.iterdir() if p.is_file()}
    names = meta[key].fillna("").map(lambda p: Path(p).name)
    matched = meta[names.isin(masks.keys())]
    if matched.empty:
        raise InputError(f"no image of {csv} has a mask in {mask_dir} (matched on the file name in column {key})")
    pairs = pd.DataFrame({"image": [str(data / p) for p in matched["path"]],
                          "mask": [str(masks[n]) for n in names[matched.index]]})
    if "patient_id" in matched.columns:
        pairs["patient_id"] = matched["patient_id"].fillna("").to_numpy()
    return pairs.drop_duplicates("image").sort_values("image", ignore_index=True)
