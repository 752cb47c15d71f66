"""The metric table: the one home of the EMI metrics' names, directions and aggregations.

It drives the task YAML generator (``metric_list`` and the groups' ``aggregate_metric_list``), the
per-document and per-task functions lmms-eval calls (``lmms_emi.harness.task_utils``), the per-task values
of a finished analysis, and the merge of the final numbers into lmms-eval's results JSON.

A metric's per-task value is read from a ``TaskResult`` of the pipeline by attribute (``source``), so this
module needs no project import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FILTER",
    "METRICS",
    "RECORD_METRIC",
    "RESULT_ONLY",
    "TASK_METRICS",
    "Metric",
    "group_aggregate",
    "metric",
    "result_keys",
    "task_values",
]

FILTER = "none"  # lmms-eval's filter name in ``<metric>,<filter>`` result keys


@dataclass(frozen=True)
class Metric:
    """One EMI metric as lmms-eval sees it.

    ``source``: the ``TaskResult`` field holding the per-task value (``emi_ci[0]`` style for interval ends);
    ``group``: the aggregation over a group's subtasks: "mean" (of the finite values), "sum" or "none";
    ``scope``: the subtasks a group value is over: "all", or "ood" (the shifted tasks: EMID and the bounds);
    ``in_tasks``: listed in the task YAMLs' ``metric_list`` (False: written into the results JSON only).
    """

    name: str
    higher_is_better: bool
    source: str
    group: str
    description: str
    scope: str = "all"
    in_tasks: bool = True

    @property
    def key(self) -> str:
        """The key lmms-eval's results JSON uses (``<metric>,none``)."""
        return f"{self.name},{FILTER}"

    def value(self, result: Any, *, entropy_scale: float | None = None) -> Any:
        """This metric's value for a ``TaskResult`` (the Theorem 4.5 bound when an entropy scale is set)."""
        if self.name == "emid_bound" and entropy_scale is not None and result.bound_theorem is not None:
            return result.bound_theorem
        field, _, index = self.source.partition("[")
        value = getattr(result, field)
        if index:
            return None if value is None else value[int(index.rstrip("]"))]
        return value


METRICS: tuple[Metric, ...] = (
    Metric("emi", True, "emi", "mean", "EMI (nats); a group's value is the mean over all its tasks"),
    Metric("emi_n", True, "n", "sum", "samples EMI is computed on"),
    Metric("emi_ci_low", True, "emi_ci[0]", "none", "lower end of EMI's bootstrap interval"),
    Metric("emi_ci_high", True, "emi_ci[1]", "none", "upper end of EMI's bootstrap interval"),
    Metric("emid", False, "emid", "mean", "EMID = EMI(ID) − EMI(task)", "ood"),
    Metric("emid_bound", False, "bound", "mean", "EMID upper bound", "ood"),
    Metric("emid_bound_partial", False, "partial_bound", "mean", "reference-free part √D_v + √D_t", "ood"),
    Metric("emid_ci_low", False, "emid_ci[0]", "none", "EMID interval, low", "ood", in_tasks=False),
    Metric("emid_ci_high", False, "emid_ci[1]", "none", "EMID interval, high", "ood", in_tasks=False),
)
TASK_METRICS: tuple[Metric, ...] = tuple(m for m in METRICS if m.in_tasks)
RESULT_ONLY: tuple[Metric, ...] = tuple(m for m in METRICS if not m.in_tasks)
_BY_NAME = {m.name: m for m in METRICS}
#: the metric whose per-document record carries the sample (question, response, reference, doc_id)
RECORD_METRIC = "emi"


def metric(name: str) -> Metric:
    """The metric called ``name`` (KeyError for an unknown one)."""
    return _BY_NAME[name]


def task_values(
    result: Any, *, entropy_scale: float | None = None, metrics: Iterable[Metric] = METRICS
) -> dict[str, Any]:
    """``{metric name: value}`` of one ``TaskResult``."""
    return {m.name: m.value(result, entropy_scale=entropy_scale) for m in metrics}


def group_aggregate(
    kind: str, values: Sequence[Any], sizes: Sequence[int] = (), weight_by_size: bool = False
) -> float | int | None:
    """Aggregate subtask values: "mean" of the finite ones (None when there is none; the ID task's EMID is
    None), "sum" (sample counts) or "none" (a mean of interval ends means nothing)."""
    if kind == "none":
        return None
    weights = list(sizes) if sizes else [1] * len(values)
    pairs = [
        (float(v), int(w))
        for v, w in zip(values, weights, strict=False)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    if kind == "sum":
        return int(sum(v for v, _ in pairs))
    if not pairs:
        return None
    if weight_by_size:
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else None
    return sum(v for v, _ in pairs) / len(pairs)


def result_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"<metric>,none": value}`` as lmms-eval writes per-task results."""
    return {f"{name},{FILTER}": value for name, value in values.items()}
