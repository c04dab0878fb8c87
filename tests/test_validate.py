"""`covidcxr validate`: the local validation report, its verdict in each state and its subgroups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from covidcxr.config import IngestConfig, ValidateSettings
from covidcxr.data.ingest import ingest
from covidcxr.hospital.validate import decide, split_refused

slow = pytest.mark.slow  # trains the shared tiny run, runs `covidcxr validate` in a subprocess


def site(root: Path, xray_source, n: int, seed: int, **columns) -> Path:
    """An ingested toy site of n images; `columns` become metadata.csv columns (a function of the row number)."""
    (root / "src").mkdir(parents=True)
    src = xray_source(root / "src", n, seed=seed, sources=("site", "site"))
    meta = pd.read_csv(src / "metadata.csv")
    for name, value in columns.items():
        meta[name] = [value(i) for i in range(n)]
    meta.to_csv(src / "metadata.csv", index=False)
    ingest([src], root / "data", IngestConfig(size=64, workers=1))
    return root / "data"


def validate(run: Path, data: Path, out: Path, *flags: str) -> dict:
    r = run_cli("validate", str(run), "--data", str(data), "--out", str(out), "--n-boot", "200", *flags)
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "validation.json").read_text())
    assert r.stdout.startswith(record["verdict"] + ":")
    return record


@pytest.fixture(scope="module")
def labelled_site(xray_source, tmp_path_factory) -> Path:
    """60 toy films whose table knows sex (half each), modality (CR/DX), age group (5 children: too few) and date."""
    return site(tmp_path_factory.mktemp("vsite"), xray_source, 60, 21, sex=lambda i: "MF"[i // 2 % 2],
                modality=lambda i: "CR" if i < 30 else "DX", age_group=lambda i: "pediatric" if i < 5 else "adult",
                date=lambda i: f"2026-01-{i % 28 + 1:02d}")


@pytest.fixture(scope="module")
def report(tiny_run, labelled_site, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vreport") / "report"
    return out, validate(tiny_run, labelled_site, out, "--min-sensitivity", "0", "--min-specificity", "0")


@slow
def test_a_site_meeting_its_requirements_is_validated_with_a_full_report(report):
    out, r = report
    assert r["verdict"] == "validated" and "lower ends of the 95 % CIs" in r["reason"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert r["metrics"]["sensitivity"] == metrics["sensitivity"] and r["metrics"]["n"] == 60
    p = r["at_prevalence"]
    assert p["prevalence"] == pytest.approx(0.5) and p["ppv"]["ci95"][0] <= p["ppv"]["value"] <= p["ppv"]["ci95"][1]
    card = r["model_card"]
    assert card["transfer_learning"] is False and "trained from scratch" in card["training"]  # tiny_run: weights none
    assert card["model_id"].startswith("run-") and card["threshold"] == metrics["threshold"]
    assert r["refused"] == {} and "alarm" in r["shift"]
    wrong = (metrics["confusion"]["fp"] + metrics["confusion"]["fn"])
    assert len(r["failures"]) == min(wrong, 12)
    confidences = [f["confidence"] for f in r["failures"]]
    assert confidences == sorted(confidences, reverse=True)  # most confident first
    assert all((out / f["thumbnail"]).is_file() for f in r["failures"])
    page = (out / "report.html").read_text()
    for heading in ("Verdict", "Model card", "Subgroups", "Failures", "Shift alarm", "trained from scratch"):
        assert heading in page


@slow
def test_subgroup_rows_for_the_fields_the_site_carries(report):
    _, r = report
    groups = r["subgroups"]
    assert set(groups) == {"sex", "modality", "age_group"}  # view and manufacturer are unknown here
    assert r["site"]["dates"] == {"first": "2026-01-01", "last": "2026-01-28", "n_with_date": 60}
    assert {k: v["n"] for k, v in groups["sex"].items()} == {"F": 30, "M": 30}
    assert {k: v["n"] for k, v in groups["modality"].items()} == {"CR": 30, "DX": 30}
    assert groups["age_group"]["pediatric"] == {"n": 5, "too_few": True}
    cr = groups["modality"]["CR"]
    assert cr["n_patients"] == 15 and cr["sensitivity"]["ci95"][0] <= cr["sensitivity"]["value"]


@slow
def test_a_site_below_its_requirements_is_not_validated(tiny_run, labelled_site, tmp_path):
    r = validate(tiny_run, labelled_site, tmp_path / "r", "--min-sensitivity", "1", "--min-specificity", "1")
    assert r["verdict"] == "not validated"
    assert "sensitivity" in r["reason"] or "specificity" in r["reason"]


@slow
def test_a_site_with_few_labelled_images_has_insufficient_data(tiny_run, xray_source, tmp_path):
    small = site(tmp_path, xray_source, 12, 22)
    r = validate(tiny_run, small, tmp_path / "r")
    assert r["verdict"] == "insufficient data"
    assert r["more_images_needed"] == {"positive": 4, "negative": 4} and "label 4 more positive" in r["reason"]


def test_a_wide_interval_says_how_many_more_labelled_images_would_narrow_it():
    metrics = {"sensitivity": {"value": 0.9, "ci95": [0.8, 0.97]}, "specificity": {"value": 0.8, "ci95": [0.75, 0.85]}}
    y = np.r_[np.ones(40, int), np.zeros(40, int)]
    verdict, reason, more = decide(metrics, y, ValidateSettings(min_sensitivity=0.85, min_specificity=0.7))
    # n' = 40 (0.10 / 0.05)^2 = 160 positives, 120 more, at a prevalence of one half 240 more images
    assert verdict == "not validated" and more == {"sensitivity": 240} and "about 240 more labelled images" in reason
    verdict, reason, _ = decide(metrics, y, ValidateSettings(min_sensitivity=0.95, min_specificity=0.7))
    assert verdict == "not validated" and reason.startswith("sensitivity 0.90 (95 % CI [0.80, 0.97]) is below")


def test_images_the_gate_refused_are_counted_by_reason_and_not_scored():
    pred = pd.DataFrame({"path": list("abcd"), "status": ["scored", "refused", "refused", "scored"],
                         "reason": ["", "not a chest radiograph: Modality CT", "not a chest radiograph: Modality CT",
                                    ""]})
    scored, refused = split_refused(pred)
    assert list(scored["path"]) == ["a", "d"] and refused == {"not a chest radiograph: Modality CT": 2}
    assert split_refused(pred.drop(columns=["status", "reason"]))[1] == {}
