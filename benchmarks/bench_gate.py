"""How well the gate answers only about frontal chest radiographs, on images and collections it never saw.

    python benchmarks/bench_gate.py [--data DATA] [--cxr ../shared/cxr] [--nonfrontal ../shared/cxr-nonfrontal]
                                    [--folds 3] [--steps 600] [--out docs/results]

DATA is an ingested data folder of ../shared/cxr (e.g. `reproduce/data` after `bash scripts/main.sh`); without it
the collection is ingested into a temporary folder first. The sources are split into --folds groups. For each
group, a gate is fitted exactly as `train` fits one (covidcxr.training.gate), on the frontal films of the other
sources, on half of the lateral and CT patients of --nonfrontal and on half of the sample-image files that Python
packages ship. It is then asked about what it never saw:

- the frontal films of the held-out sources (the share scored should be >= 95 %), and of the training sources'
  patients kept out of its fitting (>= 98 %);
- the same held-out films turned 90, 180 and 270 degrees and inverted, and shown small inside a window (screenshot);
- the other half of the lateral and CT patients, and the other half of the package images (photographs);
- pages rendered here in another font and layout than the fitting's (documents), and blank, uniform and noise images
  made by other generators than the fitting's.

Each refusal kind should be refused >= 95 % of the time. It also times the fitting (train's default settings) and
the gate's cost per image in the service (one image at a time, through onnxruntime, one thread). Writes
OUT/bench_gate.json and OUT/bench_gate.md (the README's table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from covidcxr.config import GateSettings, IngestConfig
from covidcxr.data.cache import ImageCache, to_square
from covidcxr.data.ingest import ingest
from covidcxr.data.reader import read_image
from covidcxr.data.splits import patient_uniform
from covidcxr.formatting import markdown_table, percent
from covidcxr.training.gate import build_gate, negative_pools
from covidcxr.trust import negatives
from covidcxr.trust.gate import Gate
from covidcxr.trust.negatives import thumbnail

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256  # ingest's default cache side


def squares_of(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([to_square(im, SIZE, "pad") for im in images])


def test_documents(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Pages unlike the fitting's: a TrueType font, headings, form boxes and ruled tables."""
    font_path = Path(str(__import__("matplotlib").get_data_path())) / "fonts" / "ttf" / "DejaVuSerif.ttf"
    pages = []
    for _ in range(n):
        w, h = int(rng.integers(600, 1000)), int(rng.integers(800, 1200))
        im = Image.new("L", (w, h), 255)
        draw = ImageDraw.Draw(im)
        body = ImageFont.truetype(str(font_path), int(rng.integers(12, 22)))
        head = ImageFont.truetype(str(font_path), int(rng.integers(26, 40)))
        draw.text((40, 30), "Radiology Report", fill=0, font=head)
        y = 100
        while y < h - 40:
            if rng.random() < 0.2:  # a form box or a table row
                draw.rectangle((40, y, w - 40, y + 30), outline=0, width=2)
                for x in np.linspace(40, w - 40, int(rng.integers(2, 6)))[1:-1]:
                    draw.line((x, y, x, y + 30), fill=0, width=1)
            else:
                words = " ".join("".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 11))) for _ in range(8))
                draw.text((40, y), words.capitalize() + ".", fill=int(rng.integers(0, 60)), font=body)
            y += int(rng.integers(28, 50))
        pages.append(np.asarray(im, dtype=np.float32) / 255)
    return pages


def test_blank_and_noise(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Uniform gray, black, white, Poisson and Laplace noise, stripes of noise: other generators than the fitting's."""
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(np.full((300, 400), rng.random(), np.float32))
        elif kind == 1:
            out.append(np.clip(rng.poisson(rng.uniform(2, 30), (400, 400)) / 40, 0, 1).astype(np.float32))
        elif kind == 2:
            out.append(np.clip(0.5 + rng.laplace(0, 0.15, (350, 500)), 0, 1).astype(np.float32))
        elif kind == 3:
            out.append(np.repeat(rng.random((400, 1)), 400, 1).astype(np.float32) * rng.random((400, 400)) ** 0.1)
        else:
            out.append(np.full((512, 512), float(i % 2), np.float32))
    return out


def rates(gate: Gate, squares: np.ndarray) -> tuple[float, dict[str, int]]:
    """(share refused, {kind: count} of the gate's calls)."""
    verdicts = gate.check(squares)
    kinds = pd.Series([v.kind for v in verdicts]).value_counts()
    return float(np.mean([not v.accepted for v in verdicts])), {str(k): int(c) for k, c in kinds.items()}


def load_data(args: argparse.Namespace) -> tuple[ImageCache, pd.DataFrame]:
    if args.data:
        data = Path(args.data)
    else:
        data = Path(tempfile.mkdtemp(prefix="bench-gate-")) / "data"
        ingest([args.cxr], data, IngestConfig(size=SIZE))
    cache = ImageCache(data)
    return cache, cache.manifest()


def source_folds(manifest: pd.DataFrame, folds: int) -> list[list[str]]:
    """Sources dealt into `folds` groups of similar size, largest first."""
    groups: list[list[str]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for source, n in manifest["source"].value_counts().items():
        i = int(np.argmin(sizes))
        groups[i].append(str(source))
        sizes[i] += int(n)
    return groups


def nonfrontal(folder: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    meta = pd.read_csv(folder / "metadata.csv")
    return meta, {p: to_square(read_image(folder / p), SIZE, "pad") for p in meta["path"]}


def run_fold(k: int, held: list[str], cache: ImageCache, manifest: pd.DataFrame, nf_meta: pd.DataFrame,
             nf_squares: dict[str, np.ndarray], args: argparse.Namespace, work: Path) -> dict:
    rng = np.random.default_rng(k)
    is_held = manifest["source"].isin(held).to_numpy()
    kept_out = patient_uniform(manifest["patient_id"].astype(str), seed=k) < 0.15  # training sources' patients
    rows = manifest[~is_held & ~kept_out]
    thumbs = np.stack([thumbnail(s) for s in cache.load(rows["cache_index"]).numpy()])
    is_val = patient_uniform(rows["patient_id"].astype(str), seed=99) < 0.15  # sets the threshold, as a run's val
    fit_thumbs, val = thumbs[~is_val], thumbs[is_val]
    half = (patient_uniform(nf_meta["patient_id"].astype(str), seed=0) < 0.5) ^ bool(k % 2)
    files = negatives.package_files()
    train_files = [f for i, f in enumerate(files) if (i + k) % 2 == 0]
    test_files = [f for f in files if f not in train_files and f.suffix != ".npy"]
    settings = GateSettings(steps=args.steps)
    start = time.perf_counter()  # as train fits one: the negatives made, the network fitted and exported
    pools = {"frontal": fit_thumbs, **negative_pools(fit_thumbs, settings, seed=k, package_files=train_files)}
    for kind, paths in (("lateral", nf_meta.loc[half & (nf_meta["kind"] == "lateral"), "path"]),
                        ("other_modality", nf_meta.loc[half & (nf_meta["kind"] == "ct"), "path"])):
        thumbs = [thumbnail(nf_squares[p]) for p in paths]
        pools[kind] = np.concatenate([pools.get(kind, np.zeros((0, 48, 48), np.float32)), np.stack(thumbs)])
    info = build_gate(work / f"fold{k}", pools, val, settings, seed=k)
    fit_seconds = time.perf_counter() - start
    gate = Gate.load(work / f"fold{k}")
    assert gate is not None
    held_sq = cache.load(manifest.loc[is_held, "cache_index"]).numpy()
    own_sq = cache.load(manifest.loc[~is_held & kept_out, "cache_index"]).numpy()
    photos = [negatives.read_package_image(f) for f in test_files]
    result = {"held_out": held, "fit_seconds": round(fit_seconds, 1), "threshold": info["threshold"],
              "scored": {}, "refused": {}, "calls": {}}
    for source in held:
        sq = cache.load(manifest.loc[manifest["source"] == source, "cache_index"]).numpy()
        refused, calls = rates(gate, sq)
        result["scored"][source] = (1 - refused, len(sq))
        result["calls"][f"frontal:{source}"] = calls
    refused, _ = rates(gate, own_sq)
    result["scored"]["training sources, unseen patients"] = (1 - refused, len(own_sq))
    tests = {
        "rotated 90 cw": np.rot90(held_sq, -1, (1, 2)), "rotated 180": np.rot90(held_sq, 2, (1, 2)),
        "rotated 90 ccw": np.rot90(held_sq, 1, (1, 2)), "inverted": 255 - held_sq,
        "screenshot": squares_of([negatives.screenshot(held_sq[i] / 255, rng)
                                  for i in rng.integers(0, len(held_sq), 100)]),
        "lateral": np.stack([nf_squares[p] for p in nf_meta.loc[~half & (nf_meta["kind"] == "lateral"), "path"]]),
        "CT": np.stack([nf_squares[p] for p in nf_meta.loc[~half & (nf_meta["kind"] == "ct"), "path"]]),
        "photograph": squares_of([c for im in photos for c in negatives.random_crops(im, 10, rng)]),
        "document": squares_of(test_documents(rng, 60)),
        "blank, uniform or noise": squares_of(test_blank_and_noise(rng, 60)),
    }
    for kind, sq in tests.items():
        refused, calls = rates(gate, np.ascontiguousarray(sq))
        result["refused"][kind] = (refused, len(sq))
        result["calls"][kind] = calls
    one = held_sq[:1]
    gate.check(one)
    start = time.perf_counter()
    for i in range(200):
        gate.check(held_sq[i % len(held_sq)][None])
    result["ms_per_image"] = (time.perf_counter() - start) / 200 * 1000
    print(f"fold {k} ({'+'.join(held)}): fit {fit_seconds:.0f} s; scored "
          + ", ".join(f"{s} {v[0]:.3f}" for s, v in result["scored"].items()) + "; refused "
          + ", ".join(f"{s} {v[0]:.3f}" for s, v in result["refused"].items()), flush=True)
    return result


def pooled(results: list[dict], key: str) -> dict[str, tuple[float, int]]:
    """Per kind (or source): the share over all folds, weighted by images."""
    out: dict[str, list[float]] = {}
    for r in results:
        for kind, (share, n) in r[key].items():
            hits, total = out.get(kind, [0.0, 0])
            out[kind] = [hits + share * n, total + n]
    return {k: (h / t if t else float("nan"), int(t)) for k, (h, t) in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ingested data folder of --cxr (default: ingest it into a temporary folder)")
    p.add_argument("--cxr", default=str(ROOT.parent / "shared" / "cxr"),
                   help="the frontal collection (default %(default)s)")
    p.add_argument("--nonfrontal", default=str(ROOT.parent / "shared" / "cxr-nonfrontal"),
                   help="lateral films and CT slices (default %(default)s)")
    p.add_argument("--folds", type=int, default=3, help="groups of held-out sources (default 3)")
    p.add_argument("--steps", type=int, default=GateSettings().steps, help="gate fitting steps (default: train's)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"), help="folder for the results (default %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load = os.getloadavg()[0]
    cache, manifest = load_data(args)
    manifest = manifest[manifest["duplicate_of"] == ""].reset_index(drop=True)
    nf_meta, nf_squares = nonfrontal(Path(args.nonfrontal))
    work = Path(tempfile.mkdtemp(prefix="bench-gate-fits-"))
    results = [run_fold(k, held, cache, manifest, nf_meta, nf_squares, args, work)
               for k, held in enumerate(source_folds(manifest, args.folds))]
    scored, refused = pooled(results, "scored"), pooled(results, "refused")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, load {load:.2f} before the run",
              "torch_threads": torch.get_num_threads(), "folds": results, "scored": scored, "refused": refused,
              "fit_seconds_max": max(r["fit_seconds"] for r in results),
              "ms_per_image_max": max(r["ms_per_image"] for r in results)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gate.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = [[f"frontal films: {k}", percent(v, 1), n, "scored", "≥ 98 %" if k.startswith("training") else "≥ 95 %"]
            for k, (v, n) in scored.items()]
    rows += [[k, percent(v, 1), n, "refused", "≥ 95 %"] for k, (v, n) in refused.items()]
    table = markdown_table(["images the gate never saw", "share", "n", "", "target"], rows)
    text = (f"Gate benchmark (`python benchmarks/bench_gate.py`), {args.folds} folds of held-out sources; "
            f"{report['machine']}, {report['torch_threads']} torch threads.\n\n{table}\n\n"
            f"Fitting (train's settings, {args.steps} steps, the negatives made and the network exported): at most "
            f"{report['fit_seconds_max']:.0f} s per gate; "
            f"the gate's cost per image in the service: {report['ms_per_image_max']:.2f} ms (one image per call, "
            "onnxruntime, one thread).\n")
    (out / "bench_gate.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
