"""Write the final EMI numbers into lmms-eval's results JSON (atomic rewrite), driven by the metric table.

Per task (``results[<task>]``): every metric of :data:`lmms_emi.metrics.METRICS` as ``<metric>,none``
beside lmms-eval's ``samples``. Per group (``results[<group>]`` and ``groups[<group>]``): each metric's
group aggregation over its scope (EMI over all the group's tasks, EMID and the bounds over its OOD tasks),
the Pearson r (and p) between EMID and the bound and the partial bound over the OOD tasks, the ID task, and
``emid_by_task``. Top level: ``lmms_emi`` with the lmms-emi version, the encoder spec, the estimator
(name / file hash), settings, report files and each analysis.
With a judge step: per task also ``winrate,none``, ``relative_score,none``, ``judge_scored,none`` and
``judge_excluded,none``, and ``lmms_emi.judge`` (agreement with EMI, counts, cost).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmms_emi import __version__
from lmms_emi._io import atomic_write_text
from lmms_emi.metrics import FILTER, METRICS, TASK_METRICS, group_aggregate, task_values
from lmms_emi.pipeline.run import RunAnalysis
from lmms_emi.pipeline.shift import TaskResult

__all__ = ["group_entry", "rewrite_results_file", "task_entry", "update_results"]


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _leaves(group: str, group_subtasks: Mapping[str, list[str]]) -> list[str]:
    out: list[str] = []
    for child in group_subtasks.get(group, []):
        if group_subtasks.get(child):
            out.extend(_leaves(child, group_subtasks))
        else:
            out.append(child)
    return out


def task_entry(task_result: TaskResult, entropy_scale: float | None) -> dict[str, Any]:
    """``<metric>,none`` values of one task."""
    values = task_values(task_result, entropy_scale=entropy_scale, metrics=METRICS)
    out = {m.key: _finite(values[m.name]) for m in METRICS}
    out[f"emi_n,{FILTER}"] = int(task_result.n)
    out["emi_warnings"] = list(task_result.warnings)  # thin or degenerate data: see lmms_emi.pipeline.shift
    return out


def group_entry(run: RunAnalysis, leaves: list[str], entropy_scale: float | None) -> dict[str, Any] | None:
    """The group's metric values and its EMID / bound summary (None when the group has no analysed task)."""
    analysis = next((run.analysis_for(t) for t in leaves if run.analysis_for(t) is not None), None)
    if analysis is None:
        return None
    members = [t for t in analysis.tasks if t.task in leaves]
    if not members:
        return None
    ood = [t for t in members if not t.is_id and t.emid is not None]
    entry: dict[str, Any] = {}
    for m in TASK_METRICS:
        rows = ood if m.scope == "ood" else members
        entry[m.key] = group_aggregate(m.group, [m.value(t, entropy_scale=entropy_scale) for t in rows])
    bound_name = "bound_theorem" if entropy_scale is not None else "bound"
    for key, name in (("emid_pearson", bound_name), ("emid_pearson_partial", "partial_bound")):
        corr = analysis.correlation_over(name, leaves)
        entry[f"{key},{FILTER}"] = None if corr is None else _finite(corr.pearson_r)
        entry[f"{key}_pvalue,{FILTER}"] = None if corr is None else _finite(corr.pearson_p)
    entry["emid_pairs"] = len(ood)
    entry["emid_id_task"] = analysis.id_task
    entry["emid_by_task"] = {
        t.task: {
            "shift_kind": t.shift_kind,
            "emi": _finite(t.emi),
            "emid": _finite(t.emid),
            "emid_ci": None if t.emid_ci is None else [_finite(x) for x in t.emid_ci],
            "emid_bound": _finite(getattr(t, bound_name)),
            "emid_bound_partial": _finite(t.partial_bound),
        }
        for t in ood
    }
    return entry


def update_results(
    results: dict[str, Any], run: RunAnalysis, *, extra: Mapping[str, Any], reports: Mapping[str, Any]
) -> dict[str, Any]:
    """The results dict with the final EMI numbers merged in (see the module docstring)."""
    entropy_scale = run.settings.entropy_scale
    for task, entry in results.get("results", {}).items():
        try:
            task_result = run.task_result(task)
        except KeyError:
            continue
        entry.update(task_entry(task_result, entropy_scale))
        if run.judge is not None:  # winrate, relative_score, judge_scored, judge_excluded
            entry.update(run.judge.task_keys(task))
    group_subtasks = results.get("group_subtasks", {})
    for group, children in group_subtasks.items():
        if not children:
            continue
        entry = group_entry(run, _leaves(group, group_subtasks), entropy_scale)
        if entry is None:
            continue
        for section in ("results", "groups"):
            if group in results.get(section, {}):
                results[section][group].update(entry)
    results["lmms_emi"] = {
        **dict(extra),
        "version": __version__,  # with the estimator and the encoders: what makes two runs comparable
        "encoders": dict(run.encoder_spec),
        "estimator": run.estimator.to_dict(),
        "reports": {k: {kind: str(p) for kind, p in v.items()} for k, v in reports.items()},
        "warnings": list(run.warnings),
        "benchmarks": {b: a.to_dict() for b, a in run.benchmarks.items()},
        "tasks": {t: a.to_dict() for t, a in run.singles.items()},
    }
    if run.judge is not None:
        results["lmms_emi"]["judge"] = run.judge.to_dict()
    return results


def rewrite_results_file(
    path: Path, run: RunAnalysis, *, extra: Mapping[str, Any], reports: Mapping[str, Any]
) -> dict[str, Any]:
    """Read lmms-eval's results JSON, merge the EMI numbers, write it back atomically; return the new dict."""
    results = json.loads(path.read_text(encoding="utf-8"))
    results = update_results(results, run, extra=extra, reports=reports)
    atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False, default=str))
    return results
