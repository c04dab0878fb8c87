"""The command line's contract: --help everywhere, exit code 2 with one line for bad usage, tracebacks only on --debug."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from covidcxr import cli


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
], ids=lambda a: " ".join(a) or "no-command")
def test_bad_usage_exits_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("covidcxr") and "--help" in err


def test_unusable_input_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["predict", str(tmp_path / "no-run"), "x.png"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "no-run") in err


def test_train_on_missing_data_exits_2_without_traceback(tmp_path):
    """Through the real entry point: stderr is exactly one line, and no run folder is left behind."""
    missing, run = tmp_path / "no-data", tmp_path / "run"
    cmd = [sys.executable, "-m", "covidcxr.cli", "train", str(missing), "--out", str(run), "--weights", "none"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(missing) in result.stderr and "covidcxr ingest" in result.stderr
    assert result.stdout == "" and not run.exists()


def test_debug_lets_the_traceback_through(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an ingested data folder"):
        cli.main(["--debug", "train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--weights", "none"])


def test_multi_line_error_messages_are_folded_into_one_line(monkeypatch, capsys):
    def fail(args):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(cli, "_summary", fail)
    assert cli.main(["data", "summary", "DATA"]) == 2
    assert capsys.readouterr().err == "covidcxr: error: first line second line\n"
