"""Functions referenced by the task YAMLs (``!function lmms_emi.harness.task_utils.<name>``): thin glue
between lmms-eval and the run session.

The absolute module path makes lmms-eval import this module once, so every task talks to the same
:func:`lmms_emi.harness.session.current` session. Functions named after the metric table are made on
demand by the module ``__getattr__``: ``agg_<metric>`` (per-task aggregation), ``group_<kind>`` (group
aggregation) and ``process_docs__<task>`` (binds the task name; lmms-eval passes none to these hooks).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lmms_emi.harness import session
from lmms_emi.metrics import RECORD_METRIC, TASK_METRICS, group_aggregate

METRIC_NAMES = tuple(m.name for m in TASK_METRICS)


# ------------------------------------------------------------------------------------- prompt side
def _pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Mapping):  # datasets.Image(decode=False) payload
        data = image.get("bytes")
        image = Image.open(io.BytesIO(data) if data is not None else image["path"])
    return image.convert("RGB")


def doc_to_visual(doc: Mapping[str, Any]) -> list[Any]:
    """The document's image as a one-element list of RGB PIL images."""
    return [_pil(doc["image"])]


def doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """``pre_prompt + question + post_prompt`` (both empty by default, as lmms-eval's llava_in_the_wild)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: Mapping[str, Any]) -> str:
    return doc["reference_answer"]


# ------------------------------------------------------------------------------------- per document
def _response(results: Sequence[Any]) -> str:
    value = results[0] if results else ""
    if isinstance(value, list):  # repeats / multi-output models
        value = value[0] if value else ""
    return "" if value is None else str(value)


def process_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, dict]:
    """Per-document record for every EMI metric (thread-safe: a pure function of its inputs).

    The full record (question, response, reference, doc_id, task) goes under the record metric (``emi``);
    the other metrics get ``{"task", "doc_id"}`` only, their aggregations read the session.
    """
    task = doc.get(session.TASK_COLUMN)
    if task is None:
        raise ValueError(
            "lmms-emi: document without the emi_task column; the task YAML needs a "
            "`process_docs: !function lmms_emi.harness.task_utils.process_docs__<task>`"
        )
    run = session.current()
    foreign = run.foreign_task(task)
    if foreign is None:
        question, reference = doc["question"], doc.get("reference_answer")
    else:
        question, reference = foreign.doc_to_text(doc), foreign.doc_to_target(doc)
        if isinstance(reference, (list, tuple)):
            reference = reference[0] if reference else None
    record = run.add_record(task, doc, _response(results), question, reference)
    small = {"task": task, "doc_id": record["doc_id"]}
    return {name: (record if name == RECORD_METRIC else small) for name in METRIC_NAMES}


def missing_fields(foreign: session.ForeignTask, doc: Mapping[str, Any]) -> list[str]:
    """What EMI needs that a foreign task's accessors cannot give for ``doc`` (an image, a question, a
    reference answer), each with the reason."""
    missing = []
    for what, fn in (
        ("an image (doc_to_visual)", foreign.doc_to_visual),
        ("a question (doc_to_text)", foreign.doc_to_text),
        ("a reference answer (doc_to_target)", foreign.doc_to_target),
    ):
        try:
            value = fn(dict(doc))
        except Exception as exc:
            detail = f"column {exc.args[0]!r} not found" if isinstance(exc, KeyError) and exc.args else None
            missing.append(f"{what}: {detail or f'{type(exc).__name__}: {exc}'}")
            continue
        if value is None or (isinstance(value, (list, tuple, str)) and not value):
            missing.append(f"{what}: empty")
    return missing


def _check_foreign(task: str, foreign: session.ForeignTask, dataset: Any) -> None:
    """One line naming the task and what it lacks, before any generation (the run stops there)."""
    if len(dataset) == 0:
        return
    missing = missing_fields(foreign, dataset[0])
    if not missing:
        return
    from lmms_emi.errors import UsageError

    session.current().stop(
        UsageError(
            f"--metrics emi: task {task} cannot give EMI its inputs; missing {'; '.join(missing)} "
            f"(its columns: {', '.join(getattr(dataset, 'column_names', []) or [])})"
        )
    )


def _process_docs_for(task: str) -> Callable[[Any], Any]:
    def process_docs(dataset: Any) -> Any:
        run = session.current()
        foreign = run.foreign_task(task)
        if foreign is not None and foreign.process_docs is not None:
            dataset = foreign.process_docs(dataset)
        if foreign is not None:
            _check_foreign(task, foreign, dataset)
        return run.register_dataset(task, dataset)

    return process_docs


# ------------------------------------------------------------------------------------- per task (rank 0)
def _agg_for(name: str) -> Callable[[Sequence[Mapping[str, Any]]], Any]:
    if name == RECORD_METRIC:

        def aggregate(items: Sequence[Mapping[str, Any]]) -> Any:
            """Registers the task's records; EMI when the estimator needs no training, else None until the
            end of the run (the launcher then writes the final value into the results file)."""
            run = session.current()
            return run.provisional_metric(run.register_samples(items), name)

    elif name == "emi_n":

        def aggregate(items: Sequence[Mapping[str, Any]]) -> Any:
            """The number of samples EMI is computed on."""
            return len(items)

    else:

        def aggregate(items: Sequence[Mapping[str, Any]]) -> Any:
            return session.current().provisional_metric(str(items[0]["task"]) if items else None, name)

    return aggregate


# ------------------------------------------------------------------------------------- per group (rank 0)
def _group_for(kind: str) -> Callable[..., Any]:
    def aggregate(metrics: Sequence[Any], sizes: Sequence[int], weight_by_size: bool = False) -> Any:
        return group_aggregate(kind, metrics, sizes, weight_by_size)

    return aggregate


_MADE: dict[str, Any] = {}
_MADE_LOCK = threading.Lock()
_FACTORIES: tuple[tuple[str, Callable[[str], Callable[..., Any]], Callable[[str], bool]], ...] = (
    ("agg_", _agg_for, lambda rest: rest in METRIC_NAMES),
    ("group_", _group_for, lambda rest: rest in ("mean", "sum", "none")),
    ("process_docs__", _process_docs_for, bool),
)


def __getattr__(name: str) -> Any:
    """``agg_<metric>``, ``group_<kind>`` and ``process_docs__<task>``, the same object on every lookup."""
    for prefix, factory, valid in _FACTORIES:
        rest = name[len(prefix) :]
        if name.startswith(prefix) and valid(rest):
            with _MADE_LOCK:
                if name not in _MADE:
                    fn = factory(rest)
                    fn.__name__ = fn.__qualname__ = name
                    fn.__module__ = __name__
                    _MADE[name] = fn
                return _MADE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
