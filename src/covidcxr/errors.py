"""The package's expected failures: one base class, so the CLI can tell them from bugs.

An expected failure (unusable input or settings, unavailable weights, a failed parity check, leakage, a busy port)
raises a `CovidcxrError`: the CLI prints its message as one line naming the thing and the fix, and exits 2. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CovidcxrError(Exception):
    """An expected failure; its message is one line that names the thing and the fix."""


class InputError(CovidcxrError, ValueError):
    """Unusable input or settings (a ValueError too, so callers that catch ValueError keep working)."""
