"""One line for an exception of a run inside lmms-eval."""

from __future__ import annotations

import os
import traceback

from lmms_emi import scenarios as sc
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


def _dataset_frame(exc: BaseException) -> tuple[str, str] | None:
    """(task, dataset path) when ``exc`` was raised while lmms-eval loaded a task's dataset."""
    for e in _exception_chain(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            if frame.f_code.co_name == "download" and frame.f_code.co_filename.endswith(
                os.path.join("api", "task.py")
            ):
                task_obj = frame.f_locals.get("self")
                task = getattr(getattr(task_obj, "config", None), "task", "?")
                return str(task), str(getattr(task_obj, "DATASET_PATH", "?"))
    return None


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
    for e in chain:
        text = str(e)
        if isinstance(e, ValueError) and text.startswith("Tasks not found"):
            names = text.split(":", 1)[1].split(". Try")[0].strip()
            return f"unknown task(s): {names}; see `lmms-emi eval --tasks list`"
    loading = _dataset_frame(exc)
    if loading is not None:
        task, dataset = loading
        benchmark = next((b for b in sc.TASK_PREFIX if task.startswith(sc.TASK_PREFIX[b])), None)
        how = f"--data {benchmark}=PATH" if benchmark else "a local dataset path"
        return (
            f"dataset {dataset} of task {task} is not reachable ({type(root).__name__}: {first}); "
            f"it needs the Hugging Face hub (network access) or a local copy given with {how}"
        )
    return (
        f"{type(root).__name__}: {first}"
        if not isinstance(root, (ValueError, RuntimeError)) or not first
        else first
    )
