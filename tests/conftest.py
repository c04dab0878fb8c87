"""Shared test harness: the covidcxr command in a subprocess (run_cli, start_cli), where the real chest X-rays live,
writers for tiny test images (PNG/JPEG/DICOM...), and the tiny data set, run and predictor most tests share."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

SRC = Path(__file__).resolve().parents[1] / "src"
# The one limit on a covidcxr process a test waits for: generous, so that a busy machine only slows a test down, while
# a command that hangs still fails the test instead of the whole suite.
CLI_TIMEOUT_S = 600
# The shared tiny run's gate: a fraction of the default's steps tells toy films from the rest (rotations, inversions,
# photographs, pages, blank and noise images) and keeps the suite quick; tests/test_gate.py checks what it refuses.
TINY_GATE_STEPS = 300


def cli_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a covidcxr subprocess: this process's, with this checkout's src first on PYTHONPATH (so the
    code under test runs, not an installed copy), then `env` on top; a None value removes that variable."""
    merged = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def cli_command(*args: object, code: str = "") -> list[str]:
    """`python -m covidcxr.cli ARGS`; with `code`, that Python code runs first in the same process (to break
    something on purpose), then the CLI's main."""
    if not code:
        return [sys.executable, "-m", "covidcxr.cli", *map(str, args)]
    prog = f"import sys\n{code}\nfrom covidcxr.cli import main\nsys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", prog, *map(str, args)]


def run_cli(*args: object, timeout: float = CLI_TIMEOUT_S, env: Mapping[str, str | None] | None = None,
            code: str = "") -> subprocess.CompletedProcess:
    """`covidcxr ARGS` through the real entry point in a fresh process, run to its end: the exit code and the text of
    stdout and stderr. `env` changes the environment of cli_env; `code` as in cli_command."""
    return subprocess.run(cli_command(*args, code=code), capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env))


def start_cli(*args: object, env: Mapping[str, str | None] | None = None, **popen) -> subprocess.Popen:
    """`covidcxr ARGS` left running (a server, a watcher, a run to kill), in the environment run_cli gives; stdout and
    stderr are text pipes unless `popen` says otherwise. Wait for it with a timeout of CLI_TIMEOUT_S."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(cli_command(*args), env=cli_env(env), **popen)


def shared_cxr_path() -> Path:
    """../shared/cxr beside the repository root, or $COVIDCXR_SHARED."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "cxr"
    return Path(os.environ.get("COVIDCXR_SHARED", default))


@pytest.fixture(scope="session")
def shared_cxr() -> Path:
    """The real data folder; tests using it are skipped when it is absent."""
    root = shared_cxr_path()
    if not (root / "metadata.csv").is_file():
        pytest.skip(f"real chest X-rays not found at {root} (set COVIDCXR_SHARED)")
    return root


class Images:
    """Writers for small synthetic images; each returns the path it wrote."""

    @staticmethod
    def smooth(seed: int, height: int = 96, width: int = 80) -> np.ndarray:
        """A smooth random gray image in [0, 1]: different seeds give uncorrelated images, like different X-rays."""
        coarse = np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8)
        img = Image.fromarray(coarse, mode="L").resize((width, height), Image.BICUBIC)
        return np.asarray(img, dtype=np.float32) / 255.0

    @staticmethod
    def blobs(batch: int = 6, size: int = 64, seed: int = 0) -> np.ndarray:
        """uint8 (batch, size, size): a smooth bright blob on noise each, structure that a wrong resampling or flip
        would visibly change."""
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:size, 0:size] / size
        return np.stack([np.clip(200 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)
                                 + rng.normal(30, 10, (size, size)), 0, 255)
                         for cx, cy in rng.uniform(0.2, 0.8, (batch, 2))]).astype(np.uint8)

    @staticmethod
    def png_claiming_size(width: int, height: int) -> bytes:
        """A valid PNG header saying width x height, with one tiny data chunk: decodable header, absurd size."""

        def chunk(kind: bytes, payload: bytes) -> bytes:
            return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
            chunk(b"IEND", b"")

    @staticmethod
    def to_u8(img: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    @classmethod
    def save(cls, path: Path, img: np.ndarray | Image.Image, **save_args) -> Path:
        """Save a float [0, 1] gray array (or a PIL image) in the format the suffix names."""
        path.parent.mkdir(parents=True, exist_ok=True)
        pil = img if isinstance(img, Image.Image) else Image.fromarray(cls.to_u8(img), mode="L")
        pil.save(path, **save_args)
        return path

    @staticmethod
    def dicom(path: Path | None, pixels: np.ndarray | None, photometric: str = "MONOCHROME2",
              bits_stored: int = 12, **tags) -> bytes:
        """A minimal valid DICOM file (uint16 pixels); pixels=None leaves out the pixel data. Written when path."""
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CR"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        if pixels is not None:
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelData = pixels.astype(np.uint16).tobytes()
        for key, value in tags.items():
            setattr(ds, key, value)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.getvalue())
        return buf.getvalue()

    @staticmethod
    def truncated_png(path: Path, img: np.ndarray) -> Path:
        """A PNG cut off in the middle of its image data: the header is valid, decoding fails."""
        buf = io.BytesIO()
        Image.fromarray(Images.to_u8(img), mode="L").save(buf, format="PNG")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        return path


@pytest.fixture
def images() -> type[Images]:
    return Images


def xray(rng: np.random.Generator, covid: bool) -> np.ndarray:
    """A toy 'X-ray': bright body, two dark lungs, a bright abdomen below them (so that it has an up and a down, as a
    film has); COVID cases get hazy blobs in the lungs."""
    h, w = 72, 64
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.75 - 0.5 * ((((xx - 0.3) / 0.14) ** 2 + ((yy - 0.45) / 0.3) ** 2) < 1)
    img = img - 0.5 * ((((xx - 0.7) / 0.14) ** 2 + ((yy - 0.45) / 0.3) ** 2) < 1)
    img = np.where(yy > 0.8, 0.95, img)
    if covid:
        img = img + 0.35 * ((((xx - rng.uniform(0.25, 0.75)) / 0.1) ** 2
                            + ((yy - rng.uniform(0.4, 0.7)) / 0.12) ** 2) < 1)
    texture = np.asarray(Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
    return np.clip(0.6 * img + 0.4 * texture / 255.0 + rng.normal(0, 0.03, img.shape), 0, 1)  # no two alike


def write_xray_source(root: Path, n: int, seed: int, sources: tuple[str, str] = ("a", "b")) -> Path:
    """n toy X-rays (even i: covid) with a generic-CSV metadata.csv; image i comes from sources[0] unless i % 3 == 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        covid = i % 2 == 0
        name = f"img{i:03d}.png"
        Image.fromarray((xray(rng, covid) * 255).astype(np.uint8)).save(root / name)
        rows.append({"path": name, "label": "covid" if covid else "normal", "patient_id": f"p{i // 2}",
                     "source": sources[0] if i % 3 else sources[1]})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """An ingested data folder of 96 toy X-rays (64 px cache), sources a (64 images) and b (32), both classes in
    each."""
    from covidcxr.config import IngestConfig
    from covidcxr.data.ingest import ingest

    root = write_xray_source(tmp_path_factory.mktemp("tiny_src"), 96, seed=0)
    data = tmp_path_factory.mktemp("tiny_data")
    report = ingest([root], data, IngestConfig(size=64, workers=1))
    assert report.kept == 96, "toy images must not look like copies of each other"
    return data


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One small training run on tiny_data, shared by every test that only reads a run folder."""
    from covidcxr.config import GateSettings, TrainConfig
    from covidcxr.training.trainer import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    return train(TrainConfig(data=str(tiny_data), out=str(out), weights="none", image_size=64, epochs=2,
                             device="cpu", seed=0, amp=False, gate=GateSettings(steps=TINY_GATE_STEPS)))


@pytest.fixture(scope="module")
def predictor(tiny_run):
    """tiny_run's Predictor (what `covidcxr predict` and the service score with), loaded once per test module."""
    from covidcxr.deploy.predict import Predictor

    return Predictor.from_run(tiny_run)


@pytest.fixture(scope="session")
def xray_source():
    """The toy X-ray source writer, for tests that need another data set than tiny_data."""
    return write_xray_source
