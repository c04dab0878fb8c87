"""COVIDx: its layout ingested (images per part + official split files), a run trained on its published split, and
COVID-19 sensitivity and PPV on its test file beside COVID-Net's figures. The data are not here: each test writes a
small fixture in the real layout (toy images; the split files' format is COVIDx's own)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli, xray
from covidcxr.data.sources import detect_layout, load_source
from covidcxr.data.splits import published_split, read_split_file
from covidcxr.errors import InputError, LeakageError


def write_covidx(root: Path, parts: dict[str, int], classes: tuple[str, str] = ("positive", "negative")) -> Path:
    """ROOT/<part>/*.png and ROOT/<part>.txt (`patient_id filename class source`), two images per patient. As in
    COVIDx CXR-2/3's test split, the test positives come from one source (ricord) and its negatives from another
    (rsna); train and val mix both."""
    rng = np.random.default_rng(7)
    for part, n in parts.items():
        (root / part).mkdir(parents=True)
        lines = []
        for i in range(n):
            covid = (i // 2) % 2 == 0
            source = ("ricord" if covid else "rsna") if part == "test" else ("ricord", "rsna", "cohen")[i % 3]
            name = f"{part}-{source}-{i:03d}.png"
            Image.fromarray((xray(rng, covid) * 255).astype(np.uint8)).save(root / part / name)
            lines.append(f"{part}{i // 2} {name} {classes[0] if covid else classes[1]} {source}")
        (root / f"{part}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_the_layout_is_detected_and_read_with_patients_sources_and_problems(tmp_path):
    root = write_covidx(tmp_path / "covidx", {"train": 6, "test": 4}, ("COVID-19", "normal"))
    with open(root / "train.txt", "a") as fh:
        fh.write("99 missing.png pneumonia cohen\n42 odd.png fracture rsna\n")
    assert detect_layout(root) == "covidx"
    rows, layout = load_source(root)
    assert layout == "covidx" and len(rows) == 12
    first = rows[rows["path"].str.endswith("train-ricord-000.png")].iloc[0]
    assert first["label"] == "covid" and first["source"] == "ricord" and first["patient_id"] == "ricord:train0"
    assert Path(first["path"]) == (root / "train" / "train-ricord-000.png").resolve()
    assert rows.loc[rows["finding"] == "normal", "label"].eq("normal").all()
    odd = rows[rows["finding"] == "fracture"].iloc[0]
    assert odd["problem"] == "unknown class 'fracture'"
    assert odd["listed_in"] == str(root / "train.txt") and odd["line"] == "8"


def test_split_files_are_read_and_a_bad_one_is_one_clear_error(tmp_path):
    good = tmp_path / "test_COVIDx9A.txt"
    good.write_text("1 a.png positive ricord\n\n2 b.png negative rsna\n")
    assert read_split_file(good)[["filename", "part"]].values.tolist() == [["a.png", "test"], ["b.png", "test"]]
    (tmp_path / "holdout.txt").write_text("1 a.png positive ricord\n")
    with pytest.raises(InputError, match="which part"):
        read_split_file(tmp_path / "holdout.txt")
    (tmp_path / "train.txt").write_text("1 a.png positive\n")
    with pytest.raises(InputError, match="train.txt:1: expected"):
        read_split_file(tmp_path / "train.txt")


def test_without_a_val_file_validation_patients_come_from_the_train_file(tmp_path):
    names = [f"i{k}.png" for k in range(400)]
    df = pd.DataFrame({"path": [f"/x/{n}" for n in names], "patient_id": [f"p{k // 2}" for k in range(400)],
                       "source": "s", "label": ["covid"] * 300 + ["normal"] * 100})  # a manifest's columns
    (tmp_path / "train.txt").write_text("".join(f"p{k // 2} {n} positive s\n" for k, n in enumerate(names[:300])))
    (tmp_path / "test.txt").write_text("".join(f"p{k // 2} {n} negative s\n" for k, n in enumerate(names[300:390],
                                                                                                  start=300)))
    split = published_split(df, [tmp_path / "train.txt", tmp_path / "test.txt"], 0.2, seed=0)
    assert split[300:390].eq("test").all() and split[390:].eq("unused").all()
    assert set(split[:300]) == {"train", "val"} and 0.1 < split[:300].eq("val").mean() < 0.3
    assert split[:300].groupby(df["patient_id"][:300]).nunique().max() == 1  # patients stay whole
    df.loc[395, "patient_id"] = "p0"  # a train patient's other image, in the test file
    (tmp_path / "test.txt").write_text("p0 i395.png negative s\n")
    with pytest.raises(LeakageError):
        published_split(df, [tmp_path / "train.txt", tmp_path / "test.txt"], 0.2, seed=0)


@pytest.mark.slow
def test_covidx_ingest_train_and_evaluate_on_its_published_split(tmp_path):
    root = write_covidx(tmp_path / "covidx", {"train": 48, "val": 16, "test": 16})
    data, run, report = tmp_path / "data", tmp_path / "run", tmp_path / "report"
    run_cli("ingest", root, "--out", data, "--size", "64", "--workers", "1").check_returncode()
    files = [str(root / f"{part}.txt") for part in ("train", "val", "test")]
    run_cli("train", data, "--out", run, "--split-file", *files, "--task", "covid-vs-rest", "--weights", "none",
            "--image-size", "64", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
            "--no-gate").check_returncode()  # the published split is the point; every test image is scored
    split = pd.read_csv(run / "split.csv")
    for part in ("train", "val", "test"):
        listed = set(read_split_file(root / f"{part}.txt")["filename"])
        assert set(split.loc[split["split"] == part, "path"].map(lambda p: Path(p).name)) == listed, part
    done = run_cli("evaluate", run, "--data", data, "--split-file", files[2], "--out", report, "--n-boot", "50",
                   "--no-diagnose")
    done.check_returncode()
    assert "COVID-19 sensitivity" in done.stdout and "PPV" in done.stdout
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["provenance"]["split"] == "listed in test.txt"
    assert metrics["sensitivity"]["value"] is not None  # the test part holds positives
    for key in ("sensitivity", "ppv"):  # PPV is undefined when a one-epoch toy model calls nothing positive
        low, high = metrics[key]["ci95"]
        assert metrics[key]["value"] is None or low <= metrics[key]["value"] <= high
    assert set(metrics["per_source"]) == {"ricord", "rsna"}  # the confound: one source per class
    table = (report / "published_comparison.md").read_text()
    for figure in ("95.5", "97.0", "97.5", "99.0", "8 positive + 8 negative", "Source confound"):
        assert figure in table, figure
