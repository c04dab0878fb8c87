"""The package's expected failures: one base class, so the CLI can tell them from bugs.

An expected failure (unusable input or settings, unavailable weights, a failed parity check, leakage, a busy port)
raises a `CovidcxrError`: the CLI prints its message as one line naming the thing and the fix, and exits 2. Anything
else is a bug and keeps its traceback. Each class also keeps the built-in base its callers caught before (ValueError,
FileNotFoundError, ...), so `except ValueError` code written against the old raises keeps working.
"""

from __future__ import annotations

from pathlib import Path


class CovidcxrError(Exception):
    """An expected failure; its message is one line that names the thing and the fix."""


class CovidcxrWarning(UserWarning):
    """A choice made for the user that they should know about (the CLI prints it as one line)."""


class InputError(CovidcxrError, ValueError):
    """Unusable input or settings (a ValueError too, so callers that catch ValueError keep working)."""


class MissingInputError(InputError, FileNotFoundError):
    """A named file or folder does not exist or is not what the command needs."""


class RunExistsError(InputError, FileExistsError):
    """The output folder already holds a result that would be overwritten."""


class ImageReadError(InputError):
    """A file that cannot be turned into an image; `reason` is one short human sentence."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = " ".join(reason.split())  # decoder messages span lines; reports and logs want one
        super().__init__(f"{self.path}: {self.reason}")


class ImageRefused(ImageReadError):
    """A readable file that is not what the model answers about (a CT by its DICOM tags, a lateral view): refused, not
    unreadable, so reports count it by its reason."""


class WeightsUnavailableError(CovidcxrError, RuntimeError):
    """Pretrained weights are neither cached nor downloadable (e.g. offline)."""


class LeakageError(CovidcxrError, AssertionError):
    """The same patient appears in more than one split part."""


class ExportParityError(CovidcxrError, RuntimeError):
    """An exported model's outputs differ from the PyTorch model's beyond the tolerance."""


class PortInUseError(CovidcxrError, OSError):
    """The address to serve on is taken by another process."""


def one_line(exc: BaseException | str) -> str:
    """An exception's (or a warning's) message folded onto one line (some library messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
