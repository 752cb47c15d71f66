"""The one home of lmms-emi's error types and exit codes (no project imports here).

Every error a user can fix derives from :class:`LmmsEmiError`; entry points print it as one line
(``lmms-emi <command>: error: ...``) and exit with its ``exit_code``. The concrete classes also derive from
the built-in type a caller would expect (``ValueError`` for bad values, ``RuntimeError`` for things that
could not be done), so library users can catch either.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CheckpointError",
    "DataPathError",
    "EmbedInputError",
    "EncoderLoadError",
    "EncoderMismatchError",
    "ImplausibleResultError",
    "LmmsEmiError",
    "NotFittedError",
    "ReplayError",
    "ResponseFileError",
    "RunFailedError",
    "UsageError",
    "one_line",
]

EXIT_OK = 0  # success
EXIT_FAILED = 1  # the run itself failed (lmms-eval error, no results written)
EXIT_USAGE = 2  # a problem the user can fix: bad option, missing file, unusable input
EXIT_INTERRUPTED = 130  # Ctrl-C


class LmmsEmiError(Exception):
    """A problem the user can fix; shown as one line, no traceback."""

    exit_code: int = EXIT_USAGE


class UsageError(LmmsEmiError, ValueError):
    """A bad option, task name, path or combination of them."""


class RunFailedError(LmmsEmiError, RuntimeError):
    """The evaluation ran but failed (lmms-eval error, no results file)."""

    exit_code = EXIT_FAILED


class CheckpointError(LmmsEmiError, ValueError):
    """A CLUB checkpoint cannot be used: corrupt, unreadable, or of the wrong shape."""


class EncoderMismatchError(CheckpointError):
    """A CLUB checkpoint was trained on embeddings of other encoders than the ones in use."""


class ImplausibleResultError(LmmsEmiError, RuntimeError):
    """A computed number lies outside what the math allows (a corrupt estimator or a numerical fault); it is
    refused, never reported. Names the estimator and the task."""

    exit_code = EXIT_FAILED


class NotFittedError(LmmsEmiError, ValueError, AttributeError):
    """An estimator was asked for an estimate before it was fitted or loaded (scikit-learn's convention)."""


class EncoderLoadError(LmmsEmiError, RuntimeError):
    """An encoder could not be loaded (hub unreachable, bad local folder, unknown name)."""


class EmbedInputError(LmmsEmiError, ValueError):
    """A sample that cannot be embedded (unreadable image, non-text response, ...); names the sample."""


class ResponseFileError(LmmsEmiError, ValueError):
    """A response file is missing, malformed, or does not match the dataset rows."""


class DataPathError(LmmsEmiError, ValueError):
    """A local dataset path that is not a usable copy of a benchmark."""


class ReplayError(LmmsEmiError, RuntimeError):
    """The replay model has no saved response for a request."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its type name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
