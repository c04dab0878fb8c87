"""Argument types and the parser class shared by every command: a bad value is a usage error (exit 2, one
line) before any work starts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from covidcxr.config import AUTO, COUNT, FRACTION, IMAGE_SIZE, NON_NEGATIVE, PORT, POSITIVE, POSITIVE_INT, Rule

Commands = argparse._SubParsersAction  # what add_subparsers returns, to which each command module adds its parsers


class Parser(argparse.ArgumentParser):
    """argparse with the exit-code contract's one-line usage error (the usage text stays in --help).

    Sub-command parsers are built from the parent's class, so this covers every sub-command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _typed(convert: Callable[[str], Any], rule: Rule) -> Callable[[str], Any]:
    """An argparse type that converts and checks against one of config's rules, so a bad value is a usage error
    (exit 2, one line) before any work starts."""
    accepts, what = rule

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _image_size(text: str) -> int | str:
    return AUTO if text == AUTO else int(text)


POSITIVE_INT_ARG = _typed(int, POSITIVE_INT)
COUNT_ARG = _typed(int, COUNT)
POSITIVE_ARG = _typed(float, POSITIVE)
NON_NEGATIVE_ARG = _typed(float, NON_NEGATIVE)
FRACTION_ARG = _typed(float, FRACTION)
PORT_ARG = _typed(int, PORT)
IMAGE_SIZE_ARG = _typed(_image_size, IMAGE_SIZE)
