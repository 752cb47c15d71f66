"""The class-level patches of lmms-eval that a run inside it needs, and the run they serve.

:func:`activate` makes a run this process's (:func:`active`) and installs, once per process, wrappers of
``TaskManager.__init__`` (the run's task folder appended to ``include_path``; built-in and
``--include_path`` names win), ``EvaluationTracker.save_results_aggregated`` (a results-file name no other
run uses, then the run finished with the very file lmms-eval wrote) and ``save_results_samples``, and of
``ConfigurableTask``'s ``process_results`` / ``aggregation`` / ``higher_is_better`` (EMI beside a
``--metrics emi`` task's own metrics) and ``download`` (a dataset that fails to load is one line naming the
task; a local copy is read once per run, :func:`~lmms_emi.lmms_eval_compat.loads_from_disk_shared`). The
classes come from :mod:`lmms_emi.lmms_eval_compat`, the one boundary with lmms-eval. Without an
active run every wrapper calls the original only.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

from lmms_emi import lmms_eval_compat as compat
from lmms_emi import scenarios as sc
from lmms_emi._io import reserve_file
from lmms_emi.errors import DataPathError

__all__ = ["PATCH_MARK", "RESULTS_SUFFIX", "activate", "active", "install_patches"]

_ACTIVE: Any = None  # the active lmms_emi.harness.launch.EvalRun
_LOADED: dict[str, Any] = {}  # the active run's local dataset folders (compat.loads_from_disk_shared)
PATCH_MARK = "__lmms_emi_patch__"


def active() -> Any:
    """The run this process is in, when one was prepared."""
    return _ACTIVE


def activate(prep: Any) -> None:
    """Make ``prep`` this process's run (None: none) and install the patches it needs."""
    global _ACTIVE
    if prep is not None:
        install_patches()
    _ACTIVE = prep
    _LOADED.clear()


def install_patches() -> None:
    """Wrap, once per process (idempotent), two lmms-eval class attributes; both do nothing without an
    active run: ``TaskManager.__init__`` appends the run's task folder to ``include_path`` (after the
    built-in tasks and the user's ``--include_path``, so their names win) and registers ``--metrics emi``
    tasks; ``EvaluationTracker.save_results_aggregated`` finishes the run (``EvalRun.finish``) with the very
    results file it just wrote."""
    tracker = compat.evaluation_tracker_class()
    _wrap(compat.task_manager_class(), "__init__", _task_manager_init)
    _wrap(tracker, "save_results_aggregated", _save_results_aggregated)
    _wrap(tracker, "save_results_samples", _save_results_samples)
    for name, make in (
        ("process_results", _process_results),
        ("aggregation", _aggregation),
        ("higher_is_better", _higher_is_better),
        ("download", _download),
    ):
        _wrap(compat.configurable_task_class(), name, make)


# ---------------------------------------------------------------- --metrics emi: EMI beside a task's own
def _scored_here(task: Any) -> bool:
    """Whether ``task`` (an lmms-eval task object) is one of the active run's ``--metrics emi`` tasks."""
    prep = _ACTIVE
    if prep is None or prep.plan is None or prep.plan.folder is None:
        return False
    return getattr(getattr(task, "config", None), "task", None) in prep.plan.foreign


def _process_results(original: Any, signature: inspect.Signature) -> Any:
    def process_results(self: Any, doc: Any, results: Any, *args: Any, **kwargs: Any) -> Any:
        own = original(self, doc, results, *args, **kwargs)  # the task's own metrics, as without lmms-emi
        if not _scored_here(self):
            return own
        from lmms_emi.harness import task_utils

        return {**(own or {}), **task_utils.process_results(doc, results)}

    return process_results


def _aggregation(original: Any, signature: inspect.Signature) -> Any:
    def aggregation(self: Any) -> Any:
        own = original(self)
        if not _scored_here(self):
            return own
        from lmms_emi.harness import task_utils

        return {**own, **{m: getattr(task_utils, f"agg_{m}") for m in task_utils.METRIC_NAMES}}

    return aggregation


def _higher_is_better(original: Any, signature: inspect.Signature) -> Any:
    def higher_is_better(self: Any) -> Any:
        own = original(self)
        if not _scored_here(self):
            return own
        from lmms_emi.metrics import TASK_METRICS

        return {**own, **{m.name: m.higher_is_better for m in TASK_METRICS}}

    return higher_is_better


def _download(original: Any, signature: inspect.Signature) -> Any:
    def download(self: Any, *args: Any, **kwargs: Any) -> Any:
        prep = _ACTIVE
        if prep is None:
            return original(self, *args, **kwargs)
        try:
            with compat.loads_from_disk_shared(_LOADED):  # a local copy read once per run, not per task
                return original(self, *args, **kwargs)
        except Exception as exc:  # a task's dataset failed to load: one line naming it, and how to fix it
            prep.fail(_dataset_error(self, exc))

    return download


def _dataset_error(task_obj: Any, exc: Exception) -> DataPathError:
    """The one-line error for a task (lmms-eval task object) whose dataset failed to load with ``exc``."""
    task = str(getattr(getattr(task_obj, "config", None), "task", "?"))
    dataset = str(getattr(task_obj, "DATASET_PATH", "?"))
    first = (str(exc).strip().splitlines() or [""])[0]
    cause = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if Path(dataset).expanduser().exists():
        error = DataPathError(f"dataset {dataset} of task {task} could not be loaded ({cause})")
    else:
        benchmark = next((b for b in sc.TASK_PREFIX if task.startswith(sc.TASK_PREFIX[b])), None)
        how = f"--data {benchmark}=PATH" if benchmark else "a local dataset path"
        error = DataPathError(
            f"dataset {dataset} of task {task} is not reachable ({cause}); it needs the Hugging Face hub "
            f"(network access) or a local copy given with {how}"
        )
    error.__cause__ = exc
    return error


def _wrap(cls: type, name: str, make: Any) -> None:
    original = getattr(cls, name)
    if getattr(original, PATCH_MARK, False):
        return
    wrapper = functools.wraps(original)(make(original, inspect.signature(original)))
    setattr(wrapper, PATCH_MARK, True)
    setattr(cls, name, wrapper)


def _task_manager_init(original: Any, signature: inspect.Signature) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        prep = _ACTIVE
        if prep is None:
            original(self, *args, **kwargs)
            return
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments.get("include_path")
        paths = [given] if isinstance(given, str) else list(given or [])
        bound.arguments["include_path"] = paths + [p for p in prep.include_paths if p not in paths]
        if not prep.config.builtin_tasks:
            bound.arguments["include_defaults"] = False
        original(*bound.args, **bound.kwargs)
        prep.task_manager_built(self)

    return __init__


def _save_results_aggregated(original: Any, signature: inspect.Signature) -> Any:
    def save_results_aggregated(self: Any, *args: Any, **kwargs: Any) -> Any:
        prep = _ACTIVE
        if prep is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        claimed = _claim_results_file(self, bound.arguments.get("datetime_str"))
        if claimed is not None:
            bound.arguments["datetime_str"] = claimed.name[: -len(RESULTS_SUFFIX)]
        try:
            out = original(*bound.args, **bound.kwargs)
        except BaseException:
            if claimed is not None and claimed.stat().st_size == 0:
                claimed.unlink(missing_ok=True)  # our empty claim, never written
            raise
        results_file = _written_results_file(self)
        _save_samples_first(self, bound.arguments["results"], bound.arguments.get("samples"))
        prep.finish(bound.arguments["results"], results_file)
        return out

    return save_results_aggregated


RESULTS_SUFFIX = "_results.json"  # lmms-eval's <date id>_results.json
_SAVED_ATTR = "_lmms_emi_saved_samples"  # tasks whose sample log a tracker wrote before the EMI step


def _save_samples_first(tracker: Any, results: Any, samples: Any) -> None:
    """With ``--log_samples``: lmms-eval's sample logs written now, before the EMI step (lmms-eval writes
    them after ``save_results_aggregated``, so a failing EMI step would lose them); its own later call is
    then skipped (:func:`_save_results_samples`). Without, :meth:`EvalRun.finish` writes the EMI records."""
    if not samples or not tracker.output_path:
        return
    saved = getattr(tracker, _SAVED_ATTR, None)
    if saved is None:
        saved = set()
        setattr(tracker, _SAVED_ATTR, saved)
    for task_name in (results or {}).get("configs", {}):
        if task_name in samples and task_name not in saved:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
            saved.add(task_name)


def _save_results_samples(original: Any, signature: inspect.Signature) -> Any:
    def save_results_samples(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        saved = getattr(self, _SAVED_ATTR, None)
        if saved is not None and bound.arguments.get("task_name") in saved:
            return None  # already written before the EMI step
        return original(*bound.args, **bound.kwargs)

    return save_results_samples


def _claim_results_file(tracker: Any, datetime_str: str | None) -> Path | None:
    """Claim a results-file name no other run uses (lmms-eval's date id has one-second resolution, so two
    runs sharing an output folder can get the same one): ``<date id>_results.json``, else ``<date id>-2``,
    ... created empty and exclusively; lmms-eval then writes into it, and its sample logs share the id."""
    folder = compat.tracker_results_folder(tracker)
    if folder is None or not datetime_str:
        return None
    base = datetime_str.replace(":", "-")
    for attempt in range(1, 1000):
        path = folder / f"{base if attempt == 1 else f'{base}-{attempt}'}{RESULTS_SUFFIX}"
        if reserve_file(path):
            return path
    return None


def _written_results_file(tracker: Any) -> Path | None:
    """The results JSON ``tracker`` has just written (``<output_path>/<model>/<date id>_results.json``)."""
    date_id = compat.tracker_date_id(tracker)
    folder = compat.tracker_results_folder(tracker)
    if folder is None or not date_id:
        return None
    path = folder / f"{date_id}{RESULTS_SUFFIX}"
    return path if path.is_file() else None
