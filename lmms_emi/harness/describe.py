"""One line for an exception of a run inside lmms-eval.

Conditions a user can fix are tested where they arise and raised as :class:`~lmms_emi.errors.LmmsEmiError`
(an unknown task once the run's task index exists, a dataset that fails to load in the task's ``download``:
:mod:`lmms_emi.harness.patches`); this module finds such an error in the exception chain lmms-eval hands
back and otherwise names the root exception. It never parses lmms-eval's messages or traceback frames."""

from __future__ import annotations

from lmms_emi._io import WriteFailed
from lmms_emi.errors import LmmsEmiError

__all__ = ["describe_error", "user_error"]


def user_error(exc: BaseException) -> BaseException | None:
    """The error a user can fix behind ``exc`` (an :class:`~lmms_emi.errors.LmmsEmiError`, or a write that
    failed: a full disk), also when lmms-eval wrapped it; None otherwise."""
    return next((e for e in _exception_chain(exc) if isinstance(e, (LmmsEmiError, WriteFailed))), None)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        last = getattr(exc, "last_attempt", None)  # tenacity.RetryError around process_results
        inner = last.exception() if last is not None and hasattr(last, "exception") else None
        exc = inner or exc.__cause__ or exc.__context__
    return chain


def describe_error(exc: BaseException) -> str:
    """One line for an exception of a run."""
    chain = _exception_chain(exc)
    fixable = user_error(exc)
    if fixable is not None:
        return " ".join(str(fixable).split())
    root = chain[-1]
    if isinstance(root, OSError) and root.filename is not None and root.strerror:
        return f"{root.filename}: {root.strerror}"
    first = (str(root).strip().splitlines() or [""])[0]
    return (
        f"{type(root).__name__}: {first}"
        if not isinstance(root, (ValueError, RuntimeError)) or not first
        else first
    )
