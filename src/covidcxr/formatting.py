"""Numbers for people, one way everywhere: every report, summary and table shows a value, a percentage or a 95 %
interval through these, so an undefined value reads "n/a" in all of them (never "nan" or "None") and a table built
in one place looks like a table built in another."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

NA = "n/a"  # what an undefined value (None, NaN, inf: e.g. a sensitivity without positives) reads as


def is_defined(x: Any) -> bool:
    """A finite number: not None, NaN or inf (JSON null and pandas' NaN both mean undefined)."""
    try:
        return x is not None and math.isfinite(x)
    except TypeError:
        return False


def number(x: Any, digits: int = 3, scale: float = 1.0) -> str:
    """A value with fixed digits (times `scale`: 100 shows a fraction in %), or "n/a" where it is undefined."""
    return f"{x * scale:.{digits}f}" if is_defined(x) else NA


def percent(x: Any, digits: int = 0) -> str:
    """A fraction as a percentage with a spaced sign, "12 %", or "n/a" where it is undefined."""
    return f"{x * 100:.{digits}f} %" if is_defined(x) else NA


def interval(ci: Sequence[Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    """A 95 % interval, "[lo, hi]", each end "n/a" where undefined (an interval that is missing altogether too)."""
    lo, hi = ci if ci is not None else (None, None)
    return f"[{number(lo, digits, scale)}, {number(hi, digits, scale)}]"


def value_ci(value: Any, ci: Sequence[Any] | None, digits: int = 3, scale: float = 1.0,
             drop_unknown_ci: bool = False) -> str:
    """"value [lo, hi]". With `drop_unknown_ci` an interval whose low end is undefined is left out, and an undefined
    value is a bare "n/a": for tables where a single seed or a one-class site has no interval to show."""
    if drop_unknown_ci and not is_defined(value):
        return NA
    if drop_unknown_ci and (ci is None or not is_defined(ci[0])):
        return number(value, digits, scale)
    return f"{number(value, digits, scale)} {interval(ci, digits, scale)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (no trailing newline): a header row, the `|---|` rule, then one line per row; cells
    are shown with str() as they are (a "|" inside one is not escaped) and an empty cell as one space."""
    def line(cells: Sequence[Any]) -> str:
        return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {list(row)}")
    return "\n".join([line(header), "|---" * len(header) + "|", *(line(row) for row in rows)])
