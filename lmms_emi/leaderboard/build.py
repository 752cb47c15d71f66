"""Building the leaderboard: one row per (model, run, benchmark) from each run's analyses and lmms-eval's own
per-task metrics, ranked within each benchmark (:func:`build_leaderboard`). Nothing is re-estimated, unless
``common_estimator``: then the runs are re-scored first from their saved embeddings
(:mod:`lmms_emi.leaderboard.rescore`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmms_emi.errors import UsageError
from lmms_emi.leaderboard.render import COLUMNS, DEFAULT_SORT, SHIFT_KINDS, SORTABLE, Leaderboard
from lmms_emi.leaderboard.runs import (
    RunResults,
    comparability_problems,
    encoders_label,
    estimator_label,
    load_runs,
)
from lmms_emi.metrics import FILTER, METRICS

__all__ = ["build_leaderboard"]

_EXTRA_AT = COLUMNS.index("estimator")
#: the EMI metrics: their per-task values are summarised by the stable columns, not as metric columns
_EMI_METRICS = frozenset(m.name for m in METRICS if m.name.startswith("emi"))
_AGGREGATION = {m.name: m.group for m in METRICS}  # other metrics of the table: their group aggregation


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _mean(values: Iterable[Any]) -> float | None:
    xs = [v for v in (_finite(x) for x in values) if v is not None]
    return sum(xs) / len(xs) if xs else None


def _mean_ci(tasks: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """The interval of the mean EMI over ``tasks``: the means of their interval ends, when every task has
    one (exact when the tasks' errors move together, wider than needed otherwise), else no interval."""
    cis = [t.get("emi_ci") for t in tasks]
    if not cis or any(not ci or _finite(ci[0]) is None or _finite(ci[1]) is None for ci in cis):
        return None, None
    return _mean(ci[0] for ci in cis), _mean(ci[1] for ci in cis)  # type: ignore[index]


# ------------------------------------------------------------------------------------------------ rows
def _metric_column(name: str, filt: str) -> str:
    col = name if filt == FILTER else f"{name}@{filt}"
    return f"metric_{col}" if col in COLUMNS else col


def _is_extra_metric(name: str) -> bool:
    return (
        name not in _EMI_METRICS
        and not name.startswith("emid_pearson")
        and not name.endswith("_stderr")
        and "_stderr_" not in name
    )


def _extra_metrics(run: RunResults, tasks: Sequence[str]) -> tuple[dict[str, float | None], dict[str, bool]]:
    """Other per-task metrics of lmms-eval's results (a judge's ``winrate,none``, ...): column -> mean over
    the tasks that report a finite value (the sum for a metric whose group aggregation in the metric table
    is "sum"); and column -> higher is better."""
    values: dict[str, list[float]] = {}
    higher: dict[str, bool] = {}
    sums: dict[str, bool] = {}
    results = run.data.get("results") or {}
    hib = run.data.get("higher_is_better") or {}
    for task in tasks:
        entry = results.get(task)
        if not isinstance(entry, Mapping):
            continue
        for key, value in entry.items():
            name, sep, filt = str(key).partition(",")
            if not sep or not _is_extra_metric(name) or _finite(value) is None:
                continue
            col = _metric_column(name, filt)
            values.setdefault(col, []).append(float(value))
            higher.setdefault(col, bool((hib.get(task) or {}).get(name, True)))
            sums.setdefault(col, _AGGREGATION.get(name) == "sum")
    return {c: sum(v) if sums[c] else _mean(v) for c, v in values.items()}, higher


def _rows_of(run: RunResults, flags: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    rows: list[dict[str, Any]] = []
    directions: dict[str, bool] = {}
    for benchmark, analysis in run.analyses.items():
        tasks = [t for t in analysis.get("tasks") or [] if isinstance(t, Mapping)]
        id_task = analysis.get("id_task")
        id_row = next((t for t in tasks if t.get("task") == id_task), None)
        ood = [t for t in tasks if t.get("task") != id_task]
        scaled = (analysis.get("settings") or {}).get("entropy_scale") is not None
        bound_key = "bound_theorem" if scaled else "bound"
        emids = [(t.get("task"), _finite(t.get("emid"))) for t in ood]
        emids = [(name, v) for name, v in emids if v is not None]
        worst = max(emids, key=lambda p: p[1]) if emids else (None, None)
        corr = (analysis.get("correlations") or {}).get(bound_key) or {}
        ci = (id_row or {}).get("emi_ci") or (None, None)
        shifted = [t for t in ood if _finite(t.get("emi")) is not None]
        ood_low, ood_high = _mean_ci(shifted)
        extras, higher = _extra_metrics(run, [str(t.get("task")) for t in tasks])
        directions.update(higher)
        row: dict[str, Any] = {
            "rank": None,
            "model": run.model,
            "run": run.run,
            "benchmark": benchmark,
            "id_task": id_task,
            "n_ood_tasks": len(ood),
            "n_samples": sum(int(t.get("n") or 0) for t in tasks),
            "emi_ood_mean": _mean(t.get("emi") for t in shifted),
            "emi_ood_ci_low": ood_low,
            "emi_ood_ci_high": ood_high,
            "emi_id": _finite((id_row or {}).get("emi")),
            "emi_id_ci_low": _finite(ci[0]),
            "emi_id_ci_high": _finite(ci[1]),
            "emid_mean": _mean(v for _, v in emids),
            "emid_worst": worst[1],
            "emid_worst_task": worst[0],
            "bound_mean": _mean(t.get(bound_key) for t in ood),
            "bound_form": ("theorem" if scaled else "scale-adjusted") if ood else None,
            "r_emid_bound": _finite(corr.get("pearson_r")),
            **{
                f"emid_{kind}": _mean(t.get("emid") for t in ood if t.get("shift_kind") == kind)
                for kind in SHIFT_KINDS
            },
            **extras,
            "estimator": estimator_label(run.estimator),
            "encoders": encoders_label(run.encoders),
            "flag": "; ".join(flags) or None,
            "results_file": str(run.path),
        }
        rows.append(row)
    return rows, directions


def _rank(rows: list[dict[str, Any]], sort: str, higher_is_better: bool) -> list[dict[str, Any]]:
    """Rows grouped by benchmark (first-seen order), each group ordered by ``sort``; equal values share a
    rank, rows without a value come last, unranked."""
    order: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        order.setdefault(row["benchmark"], []).append(row)
    out: list[dict[str, Any]] = []
    sign = -1.0 if higher_is_better else 1.0
    for group in order.values():
        valued = sorted((r for r in group if _finite(r.get(sort)) is not None), key=lambda r: sign * r[sort])
        prev, rank = None, 0
        for i, row in enumerate(valued, start=1):
            if row[sort] != prev:
                rank, prev = i, row[sort]
            row["rank"] = rank
        out.extend(valued)
        out.extend(r for r in group if _finite(r.get(sort)) is None)
    return out


# ------------------------------------------------------------------------------------------ the table
def build_leaderboard(
    inputs: Sequence[str | Path],
    *,
    force: bool = False,
    sort: str = DEFAULT_SORT,
    common_estimator: Any = None,
) -> Leaderboard:
    """Read the runs named by ``inputs`` and merge them into one :class:`Leaderboard`.

    A results file found in a folder that holds no EMI (a killed or failed run) is skipped with a note.
    ``common_estimator`` (a :class:`~lmms_emi.leaderboard.rescore.CommonEstimator`): re-score every run
    with it first. UsageError (one line) for zero runs, a file named on its own that is not an lmms-eval
    results JSON or holds no EMI, an unknown sort column, or runs that are not comparable (unless
    ``force``: then shown, flagged)."""
    runs, notes = load_runs(inputs)
    sortable_now = set(SORTABLE)
    if sort not in sortable_now and not any(sort in _metric_names(r) for r in runs):
        raise UsageError(f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE)} or a metric column")
    common = None
    if common_estimator is not None:
        runs, common = common_estimator.rescore(runs)
        notes.append(common.pop("note"))
    problems = comparability_problems(runs)
    if problems and not force:
        flat = [p for ps in problems.values() for p in ps]
        more = f" (and {len(flat) - 2} more)" if len(flat) > 2 else ""
        raise UsageError(
            f"cannot rank these runs: {' | '.join(flat[:2])}{more}; evaluate every run with the same frozen "
            "estimator (--estimator; `lmms-emi train-estimator` makes one) and encoders, re-score them with "
            "one (--common-estimator), or pass --force to show them anyway, flagged"
        )
    rows: list[dict[str, Any]] = []
    directions: dict[str, bool] = {}
    for run in runs:
        flags = ["not comparable: " + " | ".join(problems[run.path])] if run.path in problems else []
        run_rows, higher = _rows_of(run, flags)
        rows.extend(run_rows)
        for col, hib in higher.items():
            directions.setdefault(col, hib)
    # the same model and run label twice (two folders, same file name): tell them apart
    seen: dict[tuple[str, str, str], int] = {}
    for row in rows:
        key = (row["model"], row["run"], row["benchmark"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            row["run"] = f"{row['run']}#{seen[key]}"
    extras = sorted({c for r in rows for c in r if c not in COLUMNS})
    columns = [*COLUMNS[:_EXTRA_AT], *extras, *COLUMNS[_EXTRA_AT:]]
    sortable = {**SORTABLE, **{c: directions.get(c, True) for c in extras}}
    if sort not in sortable:
        raise UsageError(f"cannot sort by {sort!r}; choose one of {', '.join(sortable)}")
    for row in rows:
        for col in extras:
            row.setdefault(col, None)
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        forms = {r["bound_form"] for r in rows if r["benchmark"] == benchmark and r["bound_form"]}
        if len(forms) > 1:
            notes.append(f"{benchmark}: the runs use different bound forms ({', '.join(sorted(forms))})")
    levels = {
        (a.get("settings") or {}).get("confidence_level") for r in runs for a in r.analyses.values()
    } - {None}
    if len(levels) > 1:
        notes.append(f"the runs' EMI intervals have different confidence levels ({sorted(levels)})")
    ranked = _rank(rows, sort, sortable[sort])
    return Leaderboard(ranked, columns, runs, sort, problems, force, notes, common)


def _metric_names(run: RunResults) -> set[str]:
    """The metric columns a run could add (checked before a long re-scoring)."""
    names: set[str] = set()
    for entry in (run.data.get("results") or {}).values():
        if isinstance(entry, Mapping):
            for key in entry:
                name, sep, filt = str(key).partition(",")
                if sep and _is_extra_metric(name):
                    names.add(_metric_column(name, filt))
    return names
