"""Write the final EMI numbers into lmms-eval's results JSON (atomic rewrite).

Per task (``results[<task>]``): ``emi``, ``emi_ci_low`` / ``emi_ci_high``, ``emid`` (+ CI), ``emid_bound``,
``emid_bound_partial`` (``<metric>,none`` keys, as lmms-eval writes them) beside lmms-eval's ``samples``.
Per group (``results[<group>]`` and ``groups[<group>]``): the means over its OOD tasks, the Pearson r (and p)
between EMID and the bound and the partial bound over them, the ID task, and ``emid_by_task``.
Top level: ``lmms_emi`` with the estimator, settings, report files and each benchmark's full analysis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lmms_emi._io import atomic_write_text
from lmms_emi.harness.runtime import RunAnalysis, task_metrics

FILTER = "none"


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _mean(values: Iterable[Any]) -> float | None:
    vals = [v for v in (_finite(x) for x in values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _leaves(group: str, group_subtasks: Mapping[str, list[str]]) -> list[str]:
    out: list[str] = []
    for child in group_subtasks.get(group, []):
        if group_subtasks.get(child):
            out.extend(_leaves(child, group_subtasks))
        else:
            out.append(child)
    return out


def task_entry(task_result: Any, entropy_scale: float | None) -> dict[str, Any]:
    """``<metric>,none`` values of one task."""
    values = task_metrics(task_result, entropy_scale=entropy_scale)
    ci = task_result.emid_ci or (None, None)
    values.update(emid_ci_low=ci[0], emid_ci_high=ci[1])
    out = {f"{k},{FILTER}": _finite(v) for k, v in values.items()}
    out[f"emi_n,{FILTER}"] = int(task_result.n)
    return out


def group_entry(run: RunAnalysis, leaves: list[str], entropy_scale: float | None) -> dict[str, Any] | None:
    """EMID / bound summary of a group over its OOD tasks (None when the group has no analysed task)."""
    from lmms_emi.analysis import correlate

    analysis = next((run.analysis_for(t) for t in leaves if run.analysis_for(t) is not None), None)
    if analysis is None or analysis.id_task not in [t.task for t in analysis.tasks]:
        return None
    members = [t for t in analysis.tasks if t.task in leaves]
    ood = [t for t in members if not t.is_id and t.emid is not None]
    if not members:
        return None
    bound_name = "bound_theorem" if entropy_scale is not None else "bound"
    entry: dict[str, Any] = {
        f"emi,{FILTER}": _mean(t.emi for t in members),
        f"emi_n,{FILTER}": sum(int(t.n) for t in members),
        f"emid,{FILTER}": _mean(t.emid for t in ood),
        f"emid_bound,{FILTER}": _mean(getattr(t, bound_name) for t in ood),
        f"emid_bound_partial,{FILTER}": _mean(t.partial_bound for t in ood),
        f"emi_ci_low,{FILTER}": None,
        f"emi_ci_high,{FILTER}": None,
    }
    for key, name in (("emid_pearson", bound_name), ("emid_pearson_partial", "partial_bound")):
        rows = [t for t in ood if _finite(getattr(t, name)) is not None]
        corr = correlate([t.emid for t in rows], [getattr(t, name) for t in rows], [t.task for t in rows])
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
    results: dict[str, Any], run: RunAnalysis, *, entropy_scale: float | None, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The results dict with the final EMI numbers merged in (see the module docstring)."""
    per_task = results.get("results", {})
    for task, entry in per_task.items():
        try:
            task_result = run.task_result(task)
        except KeyError:
            continue
        entry.update(task_entry(task_result, entropy_scale))
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
        "estimator": None if run.estimator is None else run.estimator.to_dict(),
        "reports": {k: {kind: str(p) for kind, p in v.items()} for k, v in run.reports.items()},
        "warnings": list(run.warnings),
        "benchmarks": {b: a.to_dict() for b, a in run.benchmarks.items()},
        "tasks": {t: a.to_dict() for t, a in run.singles.items()},
    }
    return results


def rewrite_results_file(
    path: Path, run: RunAnalysis, *, entropy_scale: float | None, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """Read lmms-eval's results JSON, merge the EMI numbers, write it back atomically; return the new dict."""
    results = json.loads(path.read_text(encoding="utf-8"))
    results = update_results(results, run, entropy_scale=entropy_scale, extra=extra)
    text = json.dumps(results, indent=2, ensure_ascii=False, default=str)
    atomic_write_text(path, text)
    return results
