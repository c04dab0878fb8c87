"""Settings of `covidcxr monitor` (and of the current window the service shows): how the prediction log is cut into
windows, and the sequential test on the readers' disagreement."""

from __future__ import annotations

import re
from dataclasses import dataclass

from covidcxr.config._rules import OPEN_FRACTION, POSITIVE_INT, Rule, check_rules
from covidcxr.errors import InputError

WINDOW = "7d"  # a week per window; "N" (a number) means N predictions per window
WINDOW_PATTERN = r"(\d+)([dh]?)"  # 7d, 24h or 500
RISE = 0.10  # the rise in the readers' disagreement rate the sequential test is tuned to find
IN_CONTROL_RUN = 10_000  # verdicts between false alerts, at least, while the disagreement rate stays at its baseline
BASELINE_DISAGREEMENT = 0.15  # expected disagreement when the model's validation scores do not say (older logs)


def parse_window(text: str) -> tuple[int, str]:
    """'7d' -> (7, 'd'), '24h' -> (24, 'h'), '500' -> (500, ''): a time span, or a number of predictions."""
    match = re.fullmatch(WINDOW_PATTERN, str(text).strip())
    if not match or int(match[1]) < 1:
        raise InputError(f"window {text!r}: give days (7d), hours (24h) or a number of predictions (500), at least 1")
    return int(match[1]), match[2]


def check_date(since: str | None) -> str | None:
    """A --since date as YYYY-MM-DD (compared with the log's ISO 8601 times), or None."""
    if since is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
        raise InputError(f"since {since!r}: write the date as YYYY-MM-DD")
    return since


@dataclass
class MonitorConfig:
    """How `monitor` reads the log; saved in monitor.json, so the figures can be traced to their settings."""

    window: str = WINDOW
    since: str | None = None  # only predictions on or after this date (YYYY-MM-DD); None: all
    rise: float = RISE  # the sequential test alerts on a disagreement rate this much above its baseline
    in_control_run: int = IN_CONTROL_RUN  # sets the alert threshold h = ln(in_control_run) (Lorden's bound)
    baseline_disagreement: float = BASELINE_DISAGREEMENT

    def __post_init__(self) -> None:
        """Check every setting when made: a bad one is one line, before the log is read."""
        parse_window(self.window)
        check_rules(self, _MONITOR_RULES)
        check_date(self.since)


_MONITOR_RULES: dict[str, Rule] = {
    "rise": OPEN_FRACTION, "in_control_run": POSITIVE_INT, "baseline_disagreement": OPEN_FRACTION,
}
