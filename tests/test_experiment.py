"""`covidcxr experiment` (a grid of settings under the cross-source protocol) and the reproduce helpers it shares."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from covidcxr import cli
from covidcxr import experiment as ex
from covidcxr.config import TrainConfig
from covidcxr.data.cache import ImageCache
from covidcxr.data.splits import MIN_CLASS, external_folds
from covidcxr.evaluation.metrics_json import evaluate_predictions
from covidcxr.reproduce import PAPER, write_summary

SETTINGS = {"plain": {}, "no-equalize": {"augment": {"equalize": False}}}
BASE = {"weights": "none", "image_size": 64, "epochs": 1, "batch_size": 16, "max_train_images": 32, "device": "cpu",
        "amp": False, "checkpoint_every": 1}


def _write_grid(path, data, **extra) -> str:
    spec = {"data": str(data), "seeds": [0], "folds": ["b"], "base": BASE, "settings": SETTINGS, **extra}
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="module")
def grid(tiny_data, tmp_path_factory):
    """A 2-setting x 1-seed grid on tiny_data, in-distribution plus the external fold that holds out source b."""
    root = tmp_path_factory.mktemp("grid")
    config = _write_grid(root / "grid.yaml", tiny_data)
    out = root / "out"
    return config, out, ex.run_experiment(config, out)


def _count_training(monkeypatch) -> list[TrainConfig]:
    calls: list[TrainConfig] = []
    real = ex.train

    def counting(cfg, resume=False):
        calls.append(cfg)
        return real(cfg, resume)

    monkeypatch.setattr(ex, "train", counting)
    return calls


def test_tiny_data_has_one_external_fold_per_source(tiny_data):
    assert external_folds(ImageCache(tiny_data).manifest(), "covid-vs-normal") == [["a"], ["b"]]


@pytest.mark.slow
def test_grid_writes_results_summary_and_figure(grid, tiny_data):
    _, out, summary = grid
    results = pd.read_csv(out / "results.csv")
    assert sorted(zip(results["setting"], results["fold"])) == sorted(
        (s, f) for s in SETTINGS for f in ("in-distribution", "b"))
    assert (results["seed"] == 0).all()
    for metric in ("auc", "sensitivity", "specificity", "spec_at_sens90"):
        assert results[metric].between(0, 1).all(), metric
    n_b = (ImageCache(tiny_data).manifest()["source"] == "b").sum()
    assert (results.loc[results["fold"] == "b", "n"] == n_b).all()  # the held-out source is the whole test part
    for name in SETTINGS:
        split = pd.read_csv(out / "runs" / name / "seed0" / "b" / "split.csv")
        assert set(split.loc[split["split"] == "test", "source"]) == {"b"}
        assert "b" not in set(split.loc[split["split"] != "test", "source"])
        ind = results[(results["setting"] == name) & (results["fold"] == "in-distribution")].iloc[0]
        assert summary.loc[name, "in_auc"] == pytest.approx(ind["auc"])
        cross = results[(results["setting"] == name) & (results["fold"] == "b")].iloc[0]
        assert summary.loc[name, "cross_auc"] == pytest.approx(cross["auc"])

    table = pd.read_csv(out / "summary.csv", index_col=0)
    assert set(table.index) == set(SETTINGS)
    md = (out / "summary.md").read_text()
    assert all(f"| {name} |" in md for name in SETTINGS)
    with Image.open(out / "comparison.png") as img:
        assert img.format == "PNG" and min(img.size) >= 300
    saved = json.loads((out / "experiment.json").read_text())  # the grid's settings, next to its results
    assert saved["settings"] == SETTINGS and saved["folds"] == ["b"] and saved["data"] == str(tiny_data)
    assert yaml.safe_load((out / "experiment.yaml").read_text()) == saved  # the same, as input the command takes


@pytest.mark.slow
def test_rerun_skips_finished_rows_and_redoes_only_missing_ones(grid, monkeypatch):
    config, out, _ = grid
    before = pd.read_csv(out / "results.csv")
    calls = _count_training(monkeypatch)
    ex.run_experiment(config, out)
    assert calls == []
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), before)

    dropped = (before["setting"] == "no-equalize") & (before["fold"] == "b")
    before[~dropped].to_csv(out / "results.csv", index=False)
    ex.run_experiment(config, out)
    assert [(c.out, c.holdout_sources) for c in calls] == [(str(out / "runs" / "no-equalize" / "seed0" / "b"), ["b"])]
    after = pd.read_csv(out / "results.csv")
    redone = after[(after["setting"] == "no-equalize") & (after["fold"] == "b")]
    assert len(after) == len(before) and len(redone) == 1
    assert redone["auc"].iloc[0] == pytest.approx(before.loc[dropped, "auc"].iloc[0])  # same finished checkpoint


@pytest.mark.slow
def test_rerun_with_changed_settings_is_refused_before_training(grid, tiny_data, tmp_path, monkeypatch):
    _, out, _ = grid
    calls = _count_training(monkeypatch)
    changed = _write_grid(tmp_path / "changed.yaml", tiny_data, base={**BASE, "lr": 0.5})
    with pytest.raises(ValueError, match="other settings"):
        ex.run_experiment(changed, out)
    assert calls == []


@pytest.mark.parametrize("extra, message", [
    ({"settings": {**SETTINGS, "typo": {"learning_rate": 0.1}}}, "setting 'typo'.*learning_rate"),
    ({"settings": {"plain": {"augment": {"rotate": 5}}}}, "setting 'plain'.*rotate"),
    ({"fold": ["b"]}, "unknown key.*fold"),
    ({"eval_task": "covid-vs-everything"}, "unknown task"),
    ({"folds": ["c"]}, "folds c are not external folds.*available: a, b"),
])
def test_bad_grid_fails_before_training(extra, message, tiny_data, tmp_path, monkeypatch):
    calls = _count_training(monkeypatch)
    config = _write_grid(tmp_path / "bad.yaml", tiny_data, **extra)
    with pytest.raises(ValueError, match=message):
        ex.run_experiment(config, tmp_path / "out")
    assert calls == [] and not (tmp_path / "out" / "runs").exists()


def test_bad_grid_through_the_cli_is_one_line(tiny_data, tmp_path, capsys):
    config = _write_grid(tmp_path / "bad.yaml", tiny_data, settings={"typo": {"learning_rate": 0.1}})
    assert cli.main(["experiment", config, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "learning_rate" in err and "typo" in err


def _manifest(counts: dict[str, tuple[int, int]],
              extra_labels: dict[str, tuple[str, int]] | None = None) -> pd.DataFrame:
    """Manifest rows: per source (covid count, normal count), plus optional (label, count) of another label."""
    rows = [(src, label) for src, (pos, neg) in counts.items() for label, n in (("covid", pos), ("normal", neg))
            for _ in range(n)]
    rows += [(src, label) for src, (label, n) in (extra_labels or {}).items() for _ in range(n)]
    df = pd.DataFrame(rows, columns=["source", "label"])
    return df.sample(frac=1, random_state=0).reset_index(drop=True)  # row order must not matter


def test_external_folds_both_class_sources_stand_alone():
    df = _manifest({"x": (MIN_CLASS, MIN_CLASS), "y": (30, 40), "tiny": (MIN_CLASS - 1, 50)})
    assert external_folds(df, "covid-vs-normal") == [["x"], ["y"], ["tiny"]]  # tiny: too few positives, negatives only


def test_external_folds_pair_one_class_sources_largest_first():
    df = _manifest({"both": (20, 20), "pos_big": (50, 0), "pos_small": (15, 0),
                    "neg_big": (0, 80), "neg_mid": (0, 30), "neg_small": (0, 12), "too_small": (3, 4)})
    assert external_folds(df, "covid-vs-normal") == [
        ["both"], ["pos_big", "neg_big"], ["pos_small", "neg_mid"], ["neg_small"]]


def test_external_folds_break_ties_by_name_and_follow_the_task():
    df = _manifest({"zeta": (20, 0), "alpha": (20, 0), "n2": (0, 25), "n1": (0, 25)}, {"pneu": ("pneumonia", 40)})
    assert external_folds(df, "covid-vs-normal") == [["alpha", "n1"], ["zeta", "n2"]]
    assert external_folds(df, "covid-vs-rest") == [["alpha", "pneu"], ["zeta", "n1"], ["n2"]]  # pneumonia is negative
    assert external_folds(df.iloc[::-1], "covid-vs-normal") == external_folds(df, "covid-vs-normal")


def _metrics(y: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    score = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, len(y)), 0, 1)
    df = pd.DataFrame({"path": [f"{i}.png" for i in range(len(y))], "source": "s",
                       "patient_id": [str(i) for i in range(len(y))], "label": np.where(y == 1, "covid", "normal"),
                       "y": y, "score": score})
    return evaluate_predictions(df, 0.5, "youden", n_boot=100, positive_label="covid")


def test_write_summary_puts_the_paper_beside_our_numbers(tmp_path):
    main = _metrics(np.arange(60) % 2, 0)
    external = {"b": _metrics(np.arange(30) % 2, 1), "c+d": _metrics(np.ones(20, int), 2)}  # c+d: positives only
    path = write_summary(tmp_path, main, external, "**Possible shortcut**: test verdict", "no ImageNet weights here",
                         TrainConfig())
    text = path.read_text()
    assert "> **Warning:** no ImageNet weights here" in text
    assert all(f"{PAPER[k] * 100:.1f}" in text for k in PAPER)
    acc = main["accuracy"]
    row = next(line for line in text.splitlines() if line.startswith("| ours, in-distribution"))
    assert f"{acc['value'] * 100:.1f} [{acc['ci95'][0] * 100:.1f}, {acc['ci95'][1] * 100:.1f}]" in row
    assert row.endswith(f"| {main['n']} |")
    one_class = next(line for line in text.splitlines() if "trained without c+d" in line)
    assert "n/a" in one_class  # AUC and specificity are undefined without negatives, not 0 or 100
    assert "trained without b" in text
    auc_b = external["b"]["auc"]["value"]
    assert f"mean AUC is {auc_b:.2f}" in text  # the positives-only fold c+d has no AUC to average
    assert "**Possible shortcut**: test verdict" in text
