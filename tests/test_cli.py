"""The command line's contract: --help everywhere, exit code 2 with one line for bad usage and expected failures,
tracebacks only on --debug or for bugs; defaults that work offline; every option documented."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from conftest import run_cli
from covidcxr import __version__, cli
from covidcxr.data.cache import MANIFEST_FILE
from covidcxr.data.sources import LAYOUTS
from covidcxr.errors import InputError

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every sub-command path, nested ones included (e.g. ('data', 'summary')), found from the parser itself."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*path, name)] + _commands(sub, (*path, name))
    return found


COMMANDS = _commands(cli.build_parser())


def test_the_design_commands_exist():
    assert {("ingest",), ("data", "summary"), ("data", "download"), ("train",), ("evaluate",), ("predict",),
            ("serve",), ("export",), ("reproduce",)} <= set(COMMANDS)


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "covidcxr")
def test_help_works_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(('covidcxr', *command))}")


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["data"],
    ["evaluate", "RUN"],
    ["predict", "RUN", "x.png", "--format", "xml"],
    ["train", "DATA", "--out", "RUN", "--epochs", "many"],
    ["ingest", "SRC", "--out", "DATA", "--square", "circle"],
    ["train", "DATA", "--out", "RUN", "--batch-size", "0"],
    ["train", "DATA", "--out", "RUN", "--epochs", "0"],
    ["train", "DATA", "--out", "RUN", "--lr", "-1"],
    ["train", "DATA", "--out", "RUN", "--target-sensitivity", "1.5"],
    ["train", "DATA", "--out", "RUN", "--image-size", "big"],
    ["predict", "RUN", "x.png", "--batch-size", "0"],
    ["serve", "RUN", "--port", "70000"],
    ["ingest", "SRC", "--out", "DATA", "--layout", "nonsense"],
], ids=lambda a: " ".join(a) or "no-command")
def test_bad_usage_exits_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("covidcxr") and "--help" in err


@pytest.mark.parametrize("argv", [
    ["predict", "{tmp}/no-run", "x.png"],
    ["experiment", "{tmp}/no-grid.yaml", "--out", "{tmp}/out"],
    ["compare", "{tmp}/no-report"],
    ["evaluate", "{tmp}/no-run", "--data", "{tmp}/no-data", "--out", "{tmp}/out"],
], ids=lambda a: a[0])
def test_unusable_input_exits_2_with_one_line(argv, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("covidcxr: error: ") and argv[1] in err


@pytest.mark.slow
def test_train_on_missing_data_exits_2_without_traceback(tmp_path):
    """Through the real entry point: stderr is exactly one line, and no run folder is left behind."""
    missing, run = tmp_path / "no-data", tmp_path / "run"
    result = run_cli("train", "--no-gate", str(missing), "--out", str(run), "--weights", "none")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(missing) in result.stderr and "covidcxr ingest" in result.stderr
    assert result.stdout == "" and not run.exists()


def test_debug_lets_the_traceback_through(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an ingested data folder"):
        cli.main(["--debug", "train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--weights", "none"])


def test_multi_line_error_messages_are_folded_into_one_line(monkeypatch, capsys):
    def fail(args):
        raise InputError("first line\nsecond line")

    monkeypatch.setattr(cli.data, "_summary", fail)
    assert cli.main(["data", "summary", "DATA"]) == 2
    assert capsys.readouterr().err == "covidcxr: error: first line second line\n"


@pytest.mark.parametrize("bug", [KeyError("manifest"), OSError("disk on fire"), TypeError("bad call")],
                         ids=lambda e: type(e).__name__)
def test_bugs_keep_their_traceback(bug, monkeypatch):
    """Only CovidcxrErrors are one-line usage errors; a KeyError or OSError from a bug is not dressed up as one."""
    def fail(args):
        raise bug

    monkeypatch.setattr(cli.data, "_summary", fail)
    with pytest.raises(type(bug)):
        cli.main(["data", "summary", "DATA"])


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("covidcxr: error: ") and result.stderr.count("\n") == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in result.stderr


def _offline(tmp_path: Path) -> dict[str, str]:
    """An empty torch hub cache, and every download sent to a closed local port: a new user's offline machine."""
    closed = "http://127.0.0.1:9"
    return {"TORCH_HOME": str(tmp_path / "empty-torch-home"), "https_proxy": closed, "HTTPS_PROXY": closed,
            "http_proxy": closed, "HTTP_PROXY": closed, "no_proxy": "", "NO_PROXY": ""}


@pytest.mark.slow
def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"covidcxr {__version__}"


@pytest.mark.slow
def test_train_defaults_work_offline_and_the_report_says_so(tiny_data, tmp_path, capsys):
    """Default weights (auto) offline: random init with one warning line, recorded and shown in the report; default
    image size (auto) is 112 on a CPU, printed and recorded."""
    run = tmp_path / "run"
    result = run_cli("train", "--no-gate", str(tiny_data), "--out", str(run), "--epochs", "1", "--device", "cpu",
                     env=_offline(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("covidcxr: warning:")]
    assert len(warnings) == 1 and "NOT transfer learning" in warnings[0] and "--weights imagenet" in warnings[0]
    assert "image size 112 px (auto on cpu" in result.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["weights"], config["weights_used"]) == ("auto", "none")
    assert (config["optimizer"], config["optimizer_used"]) == ("auto", "adamw")  # from scratch
    assert (config["image_size"], config["image_size_used"]) == ("auto", 112)
    meta = torch.load(run / "model.pt", weights_only=True)["meta"]
    assert meta["image_size"] == 112 and meta["weights_used"] == "none"
    report = tmp_path / "report"
    assert cli.main(["evaluate", str(run), "--data", str(tiny_data), "--out", str(report), "--n-boot", "20",
                     "--no-diagnose"]) == 0
    shown = json.loads((report / "metrics.json").read_text())["provenance"]["weights"]
    assert shown == "none (auto: no ImageNet weights; NOT transfer learning)"
    assert shown in (report / "report.html").read_text()


@pytest.mark.slow
def test_weights_imagenet_offline_is_one_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--no-gate", str(tiny_data), "--out", str(run), "--weights", "imagenet", "--epochs", "1",
                     "--image-size", "64", "--device", "cpu", env=_offline(tmp_path))
    _one_line_error(result, "ImageNet weights for alexnet", "--weights none", "--weights PATH")
    assert not run.exists()


@pytest.mark.slow
def test_weights_path_to_a_torchvision_state_dict(tiny_data, tmp_path):
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    run = tmp_path / "run"
    result = run_cli("train", "--no-gate", str(tiny_data), "--out", str(run), "--weights", str(weights),
                     "--epochs", "1", "--image-size", "64", "--device", "cpu", env=_offline(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr and "image size" not in result.stderr  # nothing was chosen for the user
    config = json.loads((run / "config.json").read_text())
    assert (config["weights_used"], config["optimizer_used"]) == (str(weights), "sgd")  # fine-tuning: the paper's


@pytest.mark.slow
def test_weights_path_to_a_text_file_is_one_line_naming_it(tiny_data, tmp_path):
    weights = tmp_path / "notes.txt"
    weights.write_text("these are not weights\n")
    result = run_cli("train", "--no-gate", str(tiny_data), "--out", str(tmp_path / "run"), "--weights", str(weights),
                     "--epochs", "1", "--image-size", "64", "--device", "cpu")
    _one_line_error(result, str(weights), "cannot read as PyTorch weights", "not a file torch.save wrote")


@pytest.mark.slow
def test_settings_in_a_config_file_are_validated_too(tiny_data, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("batch_size: 0\n")
    result = run_cli("train", "--no-gate", str(tiny_data), "--out", str(tmp_path / "run"), "--config", str(config))
    _one_line_error(result, "batch_size = 0", "an integer >= 1")
    _one_line_error(run_cli("train", "--no-gate", str(tiny_data), "--out", str(tmp_path / "run"), "--config",
                            str(tmp_path / "missing.yaml")), "missing.yaml", "no such file")


@pytest.mark.slow
def test_patient_leakage_is_one_line(tiny_data, tmp_path):
    """A patient with images in both sources (a manifest edited by hand): holding out one source would split them."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    manifest = pd.read_parquet(data / MANIFEST_FILE)
    first_a = manifest.index[manifest["source"] == "a"][0]
    manifest.loc[manifest.index[manifest["source"] == "b"][0], "patient_id"] = manifest.at[first_a, "patient_id"]
    manifest.to_parquet(data / MANIFEST_FILE)
    result = run_cli("train", "--no-gate", str(data), "--out", str(tmp_path / "run"), "--holdout", "b",
                     "--weights", "none",
                     "--epochs", "1", "--image-size", "64")
    _one_line_error(result, "1 patient(s) in more than one split part", "hold out every source")


@pytest.mark.slow
def test_export_parity_failure_is_one_line(tiny_run, tmp_path):
    out = tmp_path / "model.pt"
    result = run_cli("export", str(tiny_run), "--format", "torchscript", "--out", str(out),
                     code="import covidcxr.deploy.export as e; e.TOLERANCE = -1.0")  # any difference fails
    _one_line_error(result, str(out), "differ from covidcxr")


@pytest.mark.slow
def test_serve_on_a_busy_port_is_one_line(tiny_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", str(tiny_run), "--port", str(port))
    _one_line_error(result, f"127.0.0.1:{port} is already in use", "--port")
    assert result.stdout == ""


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                                                  argparse._VersionAction))]


def _parser_of(command: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "covidcxr")
def test_every_option_has_help_that_states_its_default(command):
    parser = _parser_of(command)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{command} {action.dest} has no help"
        if action.option_strings:
            assert "default" in action.help or "(required)" in action.help, f"{command} {action.option_strings}"


def test_calibrate_defaults_are_its_settings_defaults():
    """The parser reads calibrate's defaults from CalibrateSettings, so --help and a run without flags agree."""
    from covidcxr.config import CalibrateSettings

    d, parser = CalibrateSettings(), _parser_of(("calibrate",))
    given = {a.dest: a.default for a in parser._actions if a.option_strings}
    for name in ("fraction", "folds", "finetune_epochs", "lr", "n_boot", "npv", "ppv", "confidence"):
        assert given[name] == getattr(d, name), name
    assert given["candidates"] == ",".join(d.candidates) and given["target_sensitivity"] is None


def _readme_rows(command: tuple[str, ...]) -> str:
    """The README command-table rows that document `covidcxr COMMAND`."""
    section = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in section.splitlines()
                     if line.startswith("|") and f"covidcxr {' '.join(command)}" in line)


LEAF_COMMANDS = [c for c in COMMANDS
                 if not any(isinstance(a, argparse._SubParsersAction) for a in _parser_of(c)._actions)]


@pytest.mark.parametrize("command", LEAF_COMMANDS, ids=" ".join)
def test_readme_command_table_lists_every_option(command):
    rows = _readme_rows(command)
    assert rows, f"README's command table has no row for covidcxr {' '.join(command)}"
    missing = [a.option_strings[-1] for a in _options(_parser_of(command))
               if not re.search(re.escape(a.option_strings[-1]) + r"(?![\w-])", rows)]
    assert not missing, f"README's row for covidcxr {' '.join(command)} lacks {missing}"


def test_layout_names_are_listed_in_ingest_help_and_readme(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ingest", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = README.read_text()
    for name in LAYOUTS:
        assert name in help_text and f"`{name}`" in readme, name


def test_quiet_hides_progress_notes_and_verbose_cannot_go_with_it(tiny_run, tiny_data, tmp_path, capsys):
    """Library notes are log records: shown by default as plain lines on stderr, hidden by --quiet."""
    argv = ["evaluate", str(tiny_run), "--data", str(tiny_data), "--split", "all", "--n-boot", "20", "--no-diagnose"]
    assert cli.main([*argv, "--out", str(tmp_path / "loud")]) == 0
    assert re.search(r"^note: \d+ image\(s\) of .* are left out$", capsys.readouterr().err, re.M)
    assert cli.main(["--quiet", *argv, "--out", str(tmp_path / "quiet")]) == 0
    assert "note:" not in capsys.readouterr().err
    assert cli.main(["--verbose", *argv, "--out", str(tmp_path / "verbose")]) == 0
    assert re.search(r"^loaded \S+ \(alexnet, covid-vs-normal; 64 px; threshold ", capsys.readouterr().err, re.M)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--quiet", "--verbose", *argv, "--out", str(tmp_path / "both")])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
