"""Functions referenced by the task YAMLs (``!function lmms_emi.harness.task_utils.<name>``).

The absolute module path makes lmms-eval import this module once, so the run state in
:mod:`lmms_emi.harness.runtime` is shared by all tasks. Per-task functions are made on demand by the module
``__getattr__``: ``process_docs__<task>`` binds the task name (lmms-eval passes none to these hooks).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lmms_emi.harness import runtime

TASK_METRICS = ("emi", "emi_n", "emi_ci_low", "emi_ci_high", "emid", "emid_bound", "emid_bound_partial")


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

    The full record (question, response, reference, doc_id, task) goes under ``emi``; the other metrics get
    ``{"task", "doc_id"}`` only, their aggregations read the registered samples.
    """
    task = doc.get(runtime.TASK_COLUMN)
    if task is None:
        raise ValueError(
            "lmms-emi: document without the emi_task column; the task YAML needs a "
            "`process_docs: !function lmms_emi.harness.task_utils.process_docs__<task>`"
        )
    foreign = runtime.foreign_task(task)
    if foreign is None:
        question, reference = doc["question"], doc.get("reference_answer")
    else:
        question, reference = foreign.doc_to_text(doc), foreign.doc_to_target(doc)
        if isinstance(reference, (list, tuple)):
            reference = reference[0] if reference else None
    record = runtime.make_record(task, doc, _response(results), question, reference)
    small = {"task": task, "doc_id": record["doc_id"]}
    return {name: (record if name == "emi" else small) for name in TASK_METRICS}


def _process_docs_for(task: str) -> Any:
    def process_docs(dataset: Any) -> Any:
        foreign = runtime.foreign_task(task)
        if foreign is not None and foreign.process_docs is not None:
            dataset = foreign.process_docs(dataset)
        return runtime.register_dataset(task, dataset)

    process_docs.__name__ = process_docs.__qualname__ = f"process_docs__{task}"
    process_docs.__module__ = __name__
    return process_docs


_MADE: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """``process_docs__<task>``: a ``process_docs`` bound to ``task`` (same object on every lookup)."""
    prefix = "process_docs__"
    if name.startswith(prefix) and len(name) > len(prefix):
        with runtime._LOCK:
            if name not in _MADE:
                _MADE[name] = _process_docs_for(name[len(prefix) :])
            return _MADE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------- per task (rank 0)
def _task_of(items: Sequence[Mapping[str, Any]]) -> str | None:
    return str(items[0]["task"]) if items else None


def agg_emi(items: Sequence[Mapping[str, Any]]) -> float | None:
    """Registers the task's samples; EMI (nats) when an estimator is available without training, else None
    until the end of the run (``lmms-emi eval`` then writes the final value into the results file)."""
    return runtime.provisional_metric(runtime.register_samples(items), "emi")


def agg_emi_n(items: Sequence[Mapping[str, Any]]) -> int:
    """The number of samples EMI is computed on."""
    return len(items)


def agg_emi_ci_low(items: Sequence[Mapping[str, Any]]) -> float | None:
    return runtime.provisional_metric(_task_of(items), "emi_ci_low")


def agg_emi_ci_high(items: Sequence[Mapping[str, Any]]) -> float | None:
    return runtime.provisional_metric(_task_of(items), "emi_ci_high")


def agg_emid(items: Sequence[Mapping[str, Any]]) -> float | None:
    return runtime.provisional_metric(_task_of(items), "emid")


def agg_emid_bound(items: Sequence[Mapping[str, Any]]) -> float | None:
    return runtime.provisional_metric(_task_of(items), "emid_bound")


def agg_emid_bound_partial(items: Sequence[Mapping[str, Any]]) -> float | None:
    return runtime.provisional_metric(_task_of(items), "emid_bound_partial")


# ------------------------------------------------------------------------------------- per group (rank 0)
def group_mean(metrics: Sequence[Any], sizes: Sequence[int], weight_by_size: bool = False) -> float | None:
    """Mean of the subtasks' finite values (None when there is none): the ID task's EMID is None."""
    pairs = [
        (float(m), int(s))
        for m, s in zip(metrics, sizes, strict=False)
        if isinstance(m, (int, float)) and math.isfinite(m)
    ]
    if not pairs:
        return None
    if weight_by_size:
        total = sum(s for _, s in pairs)
        return sum(m * s for m, s in pairs) / total if total else None
    return sum(m for m, _ in pairs) / len(pairs)


def group_sum(metrics: Sequence[Any], sizes: Sequence[int], weight_by_size: bool = False) -> int:
    """Total of the subtasks' values (sample counts)."""
    return int(sum(m for m in metrics if isinstance(m, (int, float)) and math.isfinite(m)))


def group_none(metrics: Sequence[Any], sizes: Sequence[int], weight_by_size: bool = False) -> None:
    """No group value (a mean of confidence limits means nothing)."""
    return None
