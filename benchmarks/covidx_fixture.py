"""The COVIDx comparison table: published figures beside covidcxr's, with what covidcxr could and could not measure.

    python benchmarks/covidx_fixture.py [--covidx ROOT] [--out docs/results/covidx_comparison.md] [--work DIR]

With --covidx (a COVIDx folder: train/, test/, train.txt, test.txt ...) it ingests it, trains on its published split and
evaluates on its test file: covidcxr's row on COVIDx. Without it (the data are not on this machine), that row says
"not measured", and a toy fixture in COVIDx's layout (synthetic images written here: the positives a bright blob,
the test's positives and negatives from two sources, as in COVIDx's test) goes through the same commands, so that the
table shows the pipeline's output, labelled as a toy that says nothing about COVID-19.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from covidcxr.evaluation.published import comparison_table

FIXTURE = {"train": 120, "val": 40, "test": 40}  # images per part, two per patient
TOY = ("covidcxr, toy fixture (synthetic images in COVIDx's layout written by benchmarks/covidx_fixture.py; "
       "checks the pipeline, says nothing about COVID-19)")


def write_fixture(root: Path) -> None:
    """ROOT/<part>/*.png and ROOT/<part>.txt in COVIDx's format; positive images carry a bright blob."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 96
    for part, n in FIXTURE.items():
        (root / part).mkdir(parents=True)
        lines = []
        for i in range(n):
            positive = (i // 2) % 2 == 0
            source = ("ricord" if positive else "rsna") if part == "test" else ("ricord", "rsna", "cohen")[i % 3]
            image = 0.4 + 0.2 * rng.random((96, 96))
            if positive:
                image += 0.3 * (((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2) < 0.02)
            name = f"{part}-{i:04d}.png"
            Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(root / part / name)
            lines.append(f"{part}{i // 2} {name} {'positive' if positive else 'negative'} {source}")
        (root / f"{part}.txt").write_text("\n".join(lines) + "\n")


def cli(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "covidcxr.cli", *map(str, args)], check=True)


def measure(root: Path, work: Path, weights: str) -> dict:
    """ingest -> train --split-file -> evaluate --split-file test: the metrics.json of the test file's images."""
    files = sorted(str(f) for f in root.glob("*.txt") if any(p in f.name.lower() for p in ("train", "val", "test")))
    test = [f for f in files if "test" in Path(f).name.lower()]
    cli("ingest", root, "--out", work / "data", "--size", "64")
    cli("train", work / "data", "--out", work / "run", "--split-file", *files, "--task", "covid-vs-rest",
        "--weights", weights, "--image-size", "64", "--epochs", "3", "--device", "cpu")
    cli("evaluate", work / "run", "--data", work / "data", "--split-file", *test, "--out", work / "report",
        "--no-diagnose")
    return json.loads((work / "report" / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--covidx", help="a COVIDx folder (default: none here; a toy fixture instead)")
    ap.add_argument("--out", default="docs/results/covidx_comparison.md")
    ap.add_argument("--work", help="folder for the data folder, run and report (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        if args.covidx:
            ours = [("covidcxr", f"COVIDx at {args.covidx}", measure(Path(args.covidx), Path(work), "auto"))]
        else:
            write_fixture(Path(work) / "fixture")
            ours = [("covidcxr", "COVIDx: not on this machine, so not measured", None),
                    (TOY, "its test.txt", measure(Path(work) / "fixture", Path(work), "none"))]
    Path(args.out).write_text(comparison_table(ours))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
