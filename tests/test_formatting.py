"""The one way numbers are shown: undefined values read "n/a" in every form, intervals keep their shape, and a
Markdown table has as many cells per line as its header."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from covidcxr.formatting import NA, interval, is_defined, markdown_table, number, percent, value_ci

UNDEFINED = [None, math.nan, np.float64("nan"), math.inf, -math.inf, pd.NA, "x"]


@pytest.mark.parametrize("x", UNDEFINED, ids=repr)
def test_every_undefined_value_reads_na(x):
    assert not is_defined(x)
    assert number(x) == percent(x) == value_ci(x, None, drop_unknown_ci=True) == NA == "n/a"


def test_numbers_and_percentages():
    assert number(0.12345) == "0.123" and number(1, 1) == "1.0" and number(np.float32(0.5), 2) == "0.50"
    assert number(0.9651, 1, scale=100) == "96.5" and number(0) == "0.000"
    assert percent(0.123) == "12 %" and percent(0.9512, 1) == "95.1 %" and percent(1) == "100 %"


def test_intervals_keep_their_shape_with_undefined_ends():
    assert interval([0.1, 0.25]) == "[0.100, 0.250]"
    assert interval([None, 0.5], 2) == "[n/a, 0.50]" and interval(None) == "[n/a, n/a]"
    assert interval((0.628, 0.678), 1, scale=100) == "[62.8, 67.8]"
    assert value_ci(0.5, [0.4, 0.6], 2) == "0.50 [0.40, 0.60]"
    assert value_ci(None, [None, None]) == "n/a [n/a, n/a]"  # a report row keeps its shape


def test_an_unknown_interval_can_be_left_out():
    assert value_ci(0.5, [math.nan, math.nan], 2, drop_unknown_ci=True) == "0.50"  # one seed: no interval
    assert value_ci(0.5, None, 2, drop_unknown_ci=True) == "0.50"
    assert value_ci(0.861, [0.829, 0.89], 1, 100, drop_unknown_ci=True) == "86.1 [82.9, 89.0]"
    assert value_ci(None, [0.1, 0.2], drop_unknown_ci=True) == "n/a"


def test_markdown_table_shape():
    table = markdown_table(["name", "n", "note"], [["a", 1, "x"], ["b", 22, ""]])
    assert table == "| name | n | note |\n|---|---|---|\n| a | 1 | x |\n| b | 22 | |"
    lines = table.splitlines()
    assert len(lines) == 4 and {line.count("|") for line in lines} == {4}
    assert markdown_table(["only"], []) == "| only |\n|---|"


def test_a_row_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(["a", "b", "c"], [["1", "2"]])
