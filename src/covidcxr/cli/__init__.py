"""The `covidcxr` command: parses arguments and calls the pipeline modules, nothing else.

Exit codes: 0 all good; 1 the command ran but some inputs failed (each listed); 2 bad usage or an expected failure
(a `CovidcxrError`: one line on stderr naming the thing and the fix; the traceback only with --debug). Anything else
is a bug and keeps its traceback. Each command group's parsers and handlers live in a module of this package.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any, TextIO

from tqdm.contrib.logging import logging_redirect_tqdm

from covidcxr import __version__
from covidcxr.cli import data, deploy, evaluate, loop, site, train
from covidcxr.cli.args import Parser
from covidcxr.errors import CovidcxrError, CovidcxrWarning, one_line

# the sub-commands in the order --help lists them
COMMANDS = (data.add_ingest, data.add_data, train.add_train, evaluate.add_evaluate, deploy.add_predict,
            deploy.add_serve, deploy.add_export, train.add_reproduce, site.add_calibrate, site.add_validate,
            evaluate.add_compare, evaluate.add_diagnose, train.add_experiment, site.add_lungs, site.add_pacs,
            loop.add_feedback, loop.add_monitor)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="covidcxr", description="Chest X-ray COVID-19 screening you can check.")
    parser.add_argument("--version", action="version", version=f"covidcxr {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (default off)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="log warnings and errors only (default: also progress "
                          "notes)")
    loudness.add_argument("--verbose", action="store_true", help="log debugging detail too (default off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _one_line_warnings(default: Callable[..., None]) -> Callable[..., None]:
    """A warnings.showwarning that prints covidcxr's own warnings as one line on stderr, others as `default` does."""
    def show(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, CovidcxrWarning):
            print(f"covidcxr: warning: {one_line(message)}", file=sys.stderr)
        else:
            default(message, category, *rest, **kwargs)
    return show


DAEMONS = {"serve", "pacs"}  # long-running commands: their log lines carry a timestamp


class _PlainFormatter(logging.Formatter):
    """A command's log line as the CLI's own lines look: info as it is, warnings and errors after `covidcxr: `."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"covidcxr: {record.levelname.lower()}: {message}"


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, as logging's last-resort handler does: a caller that swaps it (a test
    capturing output, then closing it) never leaves the handler writing to a closed stream."""

    @property  # a view of sys.stderr where StreamHandler has an attribute
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """StreamHandler.__init__ sets the stream; this handler always follows sys.stderr instead."""


def configure_logging(command: str, quiet: bool, verbose: bool) -> None:
    """One stderr handler on the package's logger: plain lines for commands, timestamped ones for the daemons."""
    logger = logging.getLogger("covidcxr")
    for handler in [h for h in logger.handlers if getattr(h, "covidcxr_cli", False)]:
        logger.removeHandler(handler)  # main() called again in one process (tests): one handler, today's stderr
    handler = _StderrHandler()
    handler.covidcxr_cli = True  # type: ignore[attr-defined]  # marks the handler this function owns
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s") if command in DAEMONS
                         else _PlainFormatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.command, args.quiet, args.verbose)
    with warnings.catch_warnings(), logging_redirect_tqdm([logging.getLogger("covidcxr")]):  # lines above bars
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("covidcxr: interrupted; finished work is saved (re-run, or --resume a training run)", file=sys.stderr)
            return 130
        except CovidcxrError as exc:  # expected failures only: a bug (KeyError, OSError, ...) keeps its traceback
            if args.debug:
                raise
            print(f"covidcxr: error: {one_line(exc)}", file=sys.stderr)
            return 2

