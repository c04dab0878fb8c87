"""`covidcxr predict`: good files scored, each broken file its own line (status unreadable) with the reason, exit
code 1. The good files are toy films like those the shared tiny run's gate was fitted on, so it scores them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, xray
from covidcxr import cli
from covidcxr.evaluation.evaluate import predictions
from covidcxr.model.cam import OVERLAY_MIN_SIDE

GOOD = ("chest_png.png", "chest_jpeg.jpg", "chest_dicom.dcm")
BROKEN = {"empty.png": "empty file", "notes.png": "not an image", "cut.png": "truncated"}
MISSING = "no_such_file.png"


@pytest.fixture
def mixed(tmp_path, images) -> Path:
    """A folder of good PNG/JPEG/DICOM X-rays and broken files, plus a metadata file that is not an image."""
    folder = tmp_path / "in"
    films = [xray(np.random.default_rng(i), covid=i % 2 == 0) for i in range(3)]
    images.save(folder / GOOD[0], films[0])
    images.save(folder / GOOD[1], films[1], quality=95)
    images.dicom(folder / GOOD[2], np.rint(films[2] * 4095))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not a picture, just text with a .png name\n")
    images.truncated_png(folder / "cut.png", images.smooth(3))
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    return folder


def _predict(capsys, run: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["predict", str(run), *args])
    out, err = capsys.readouterr()
    return code, out, err


def _check_rows(rows: dict[str, dict], threshold: float) -> None:
    """Every good file scored and labelled at the run's threshold; every broken one with its reason."""
    assert set(rows) == set(GOOD) | set(BROKEN) | {MISSING}
    for name in GOOD:
        r = rows[name]
        p = float(r["probability"])
        assert 0 <= p <= 1 and r["status"] == "scored" and not r["reason"], name
        assert r["label"] == ("covid" if p >= threshold else "normal")
        assert float(r["threshold"]) == pytest.approx(threshold)
    for name, reason in {**BROKEN, MISSING: "file not found"}.items():
        assert rows[name]["status"] == "unreadable" and reason in rows[name]["reason"], name
        assert rows[name]["probability"] in (None, ""), name


def test_json_output_scores_good_files_lists_broken_ones_and_writes_cams(tiny_run, predictor, mixed, tmp_path, capsys):
    cams = tmp_path / "cams"
    code, out, err = _predict(capsys, tiny_run, str(mixed), str(mixed / MISSING), "--format", "json",
                              "--cam", str(cams))
    assert code == 1
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    _check_rows(rows, predictor.threshold)
    failed = [line for line in err.splitlines() if line.startswith("covidcxr: cannot score")]
    assert len(failed) == len(BROKEN) + 1
    written = sorted(cams.iterdir())
    assert [p.name for p in written] == sorted(f"{Path(n).stem}_cam.png" for n in GOOD)
    for path in written:
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size[0] == img.size[1] >= OVERLAY_MIN_SIDE


def test_csv_output_parses_and_matches_the_predictor(tiny_run, predictor, mixed, capsys):
    code, out, _ = _predict(capsys, tiny_run, str(mixed), str(mixed / MISSING), "--format", "csv")
    assert code == 1
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(out))}
    _check_rows(rows, predictor.threshold)
    direct = {Path(r.path).name: r.probability for r in predictor.predict_paths([mixed / n for n in GOOD])}
    for name in GOOD:
        assert float(rows[name]["probability"]) == pytest.approx(direct[name], abs=1e-12)


def test_table_gives_each_file_its_own_line(tiny_run, predictor, mixed, capsys):
    code, out, _ = _predict(capsys, tiny_run, str(mixed), str(mixed / MISSING))
    assert code == 1
    lines = out.splitlines()[1:]
    assert len(lines) == len(GOOD) + len(BROKEN) + 1
    for name, reason in {**BROKEN, MISSING: "file not found"}.items():
        line = next(line for line in lines if Path(line.split()[0]).name == name)
        assert "UNREADABLE" in line and reason in line
    for name in GOOD:
        line = next(line for line in lines if Path(line.split()[0]).name == name)
        assert line.split()[2] in ("covid", "normal")


def test_all_good_inputs_exit_0_and_an_empty_folder_is_reported(tiny_run, mixed, tmp_path, capsys):
    code, out, _ = _predict(capsys, tiny_run, *(str(mixed / n) for n in GOOD), "--format", "json")
    assert code == 0 and len(json.loads(out)) == len(GOOD)
    (tmp_path / "nothing").mkdir()
    code, out, _ = _predict(capsys, tiny_run, str(tmp_path / "nothing"), "--format", "json")
    assert code == 1 and "no image files" in json.loads(out)[0]["reason"]


def test_paths_and_bytes_score_identically(predictor, mixed):
    for name in GOOD:
        by_path = predictor.predict_paths([mixed / name])[0]
        square = predictor.read_bytes((mixed / name).read_bytes(), name)  # what the service does with an upload
        by_bytes = predictor.predict_squares({name: square})[0]
        assert by_bytes.probability == by_path.probability, name
        assert by_bytes.label == by_path.label and by_bytes.threshold == predictor.threshold


def test_a_file_scores_as_its_cached_copy_does_in_evaluation(tiny_run, tiny_data, predictor):
    """The model-input contract: decoding a file now gives the score evaluate gives its cached copy."""
    pred, _, _ = predictions(tiny_run, tiny_data, "test", device="cpu")
    scored = predictor.predict_paths([Path(p) for p in pred["path"]])
    assert [r.path for r in scored] == pred["path"].tolist()
    np.testing.assert_allclose([r.probability for r in scored], pred["score"], atol=1e-6)


@pytest.mark.slow
def test_a_broken_symlink_gets_its_own_error_row_through_the_cli(tiny_run, mixed, tmp_path):
    (mixed / "moved.png").symlink_to(tmp_path / "archive/moved.png")
    (mixed / "sub").mkdir()
    (mixed / "sub/gone.dcm").symlink_to("gone-for-good.dcm")

    result = run_cli("predict", str(tiny_run), str(mixed), "--format", "json")

    assert result.returncode == 1, result.stderr
    rows = {r["path"]: r for r in json.loads(result.stdout)}
    target = tmp_path / "archive/moved.png"
    moved = rows[str(mixed / "moved.png")]
    assert moved["reason"] == f"broken symbolic link (points to {target}, which does not exist)"
    assert rows[str(mixed / "sub/gone.dcm")]["reason"].startswith("broken symbolic link (points to gone-for-good.dcm")
    assert all(rows[str(mixed / n)]["probability"] is not None for n in GOOD)  # the good files are still scored
    assert f"covidcxr: cannot score {mixed / 'moved.png'}: broken symbolic link" in result.stderr
def test_threads_option_sets_torch_threads_and_keeps_the_scores(tiny_run, mixed, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        scores = {}
        for threads in ("1", "2"):
            code, out, _ = _predict(capsys, tiny_run, *(str(mixed / n) for n in GOOD), "--format", "json",
                                    "--threads", threads)
            assert code == 0 and torch.get_num_threads() == int(threads)
            scores[threads] = [r["probability"] for r in json.loads(out)]
        np.testing.assert_allclose(scores["1"], scores["2"], atol=1e-6)
    finally:
        torch.set_num_threads(before)


def test_zero_threads_is_a_one_line_usage_error(tiny_run, mixed, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it before any work
        cli.main(["predict", str(tiny_run), str(mixed / GOOD[0]), "--threads", "0"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--threads" in err and "'0'" in err


def test_help_states_every_default():
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for command in ("predict", "serve"):
        for action in commands[command]._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in action.help, (command, action.option_strings)
