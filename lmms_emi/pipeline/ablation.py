"""The estimator × embedding-space ablation of a judged run (paper appendix C.2, Tables 4 and 5).

For every embedding space s (a run's saved embeddings, or the same records embedded by another encoder
profile) and every MI estimator m of :data:`~lmms_emi.estimators.families.MI_ESTIMATORS`, one estimator is
fitted on s's pooled (query, response) and (query, reference) pairs (:func:`fit_pooled_estimator`, the run's
protocol, same seed / steps / early stopping) and gives every task's EMI. Then

* Table 4 cell (m, s): Spearman ρ and its two-sided p between the tasks' EMI and the judge's win rate WR
  (the judge does not depend on s or m: one WR per task), over the tasks that have both
  (:func:`~lmms_emi.pipeline.agreement.agreement`, the run's own statistic);
* Table 5 cell (j, m, s) for every JSD estimator j of :data:`~lmms_emi.estimators.families.JSD_ESTIMATORS`
  and every shift group of the run (an ID task and its shifted tasks): Pearson r and its p between
  EMID(P, Q) = EMI(P) − EMI(Q) and the scale-adjusted bound √D_v + √D_t + D_P^¼ + D_Q^¼ (D = j) over the
  shifted tasks Q (:func:`~lmms_emi.pipeline.shift.analyze_shift`, the run's own analysis, without
  bootstrap intervals).

Each cell records its wall time (a Table 4 cell: the fit plus the tasks' EMI; a Table 5 cell: one shift
analysis). A cell whose numbers cannot be computed (an estimator refused as implausible, a degenerate task)
keeps the one-line reason in ``error`` and no numbers: nothing is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmms_emi import emi as emi_lib
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import LmmsEmiError, UsageError
from lmms_emi.estimators.families import JSD_ESTIMATORS, MI_ESTIMATORS
from lmms_emi.pipeline.agreement import agreement
from lmms_emi.pipeline.estimator import DEFAULT_PATIENCE, fit_pooled_estimator
from lmms_emi.pipeline.run import plan_run
from lmms_emi.pipeline.shift import analyze_shift, json_ready

__all__ = [
    "Ablation",
    "AgreementCell",
    "BoundCell",
    "FitSettings",
    "ablate",
    "check_names",
    "count_cells",
    "run_groups",
    "space_cells",
]


@dataclass(frozen=True)
class FitSettings:
    """How each estimator is fitted (the run's protocol, :func:`fit_pooled_estimator`): at most ``steps``
    steps, ``seed``, held-out early stopping after ``patience`` evaluations without improvement (None:
    exactly ``steps``), and the CLUB's fit ``method`` ("fast" or "paper")."""

    steps: int = 5000
    seed: int = 0
    patience: int | None = DEFAULT_PATIENCE
    method: str = "fast"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AgreementCell:
    """Table 4: Spearman ρ (two-sided p) between EMI and WR over ``tasks``, one MI estimator in one space;
    ``emi``: each task's EMI (None for a task without references or responses)."""

    space: str
    mi_estimator: str
    n_tasks: int
    spearman_rho: float | None
    spearman_p: float | None
    seconds: float
    tasks: tuple[str, ...] = ()
    emi: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class BoundCell:
    """Table 5: Pearson r (two-sided p) between EMID and its scale-adjusted bound over the shifted tasks of
    ``group`` (ID task ``id_task``), one JSD estimator × MI estimator × space; ``emid`` / ``bound`` per
    shifted task."""

    space: str
    jsd_estimator: str
    mi_estimator: str
    group: str
    id_task: str
    n_tasks: int
    pearson_r: float | None
    pearson_p: float | None
    seconds: float
    emid: dict[str, float | None] = field(default_factory=dict)
    bound: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Ablation:
    """Every cell of both tables, the win rates they use, the spaces (name -> encoder spec and where its
    embeddings came from), the groups and the fit settings."""

    agreement: list[AgreementCell]
    bounds: list[BoundCell]
    win_rates: dict[str, float]
    spaces: dict[str, dict[str, Any]]
    groups: dict[str, tuple[str, tuple[str, ...]]]
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def cell(self, space: str, mi_estimator: str) -> AgreementCell:
        """The Table 4 cell of (``space``, ``mi_estimator``) (KeyError when it was not computed)."""
        for c in self.agreement:
            if (c.space, c.mi_estimator) == (space, mi_estimator):
                return c
        raise KeyError((space, mi_estimator))

    def bound_cell(
        self, space: str, jsd_estimator: str, mi_estimator: str, group: str | None = None
    ) -> BoundCell:
        """The Table 5 cell (``group``: None when the run has one group)."""
        for c in self.bounds:
            if (c.space, c.jsd_estimator, c.mi_estimator) == (space, jsd_estimator, mi_estimator) and (
                group is None or c.group == group
            ):
                return c
        raise KeyError((space, jsd_estimator, mi_estimator, group))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers None)."""
        return json_ready(
            {
                "settings": self.settings,
                "spaces": self.spaces,
                "groups": {k: {"id_task": i, "tasks": list(t)} for k, (i, t) in self.groups.items()},
                "win_rates": self.win_rates,
                "table4": [asdict(c) for c in self.agreement],
                "table5": [asdict(c) for c in self.bounds],
                "warnings": self.warnings,
            }
        )


def check_names(mi_estimators: Sequence[str], jsd_estimators: Sequence[str]) -> None:
    """UsageError (one line) for an unknown or missing estimator name."""
    for option, names, known in (
        ("--mi-estimators", mi_estimators, MI_ESTIMATORS),
        ("--jsd-estimators", jsd_estimators, JSD_ESTIMATORS),
    ):
        if not names:
            raise UsageError(f"{option}: name at least one of {', '.join(known)}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"{option}: unknown estimator {unknown[0]!r}; one of {', '.join(known)}")


def run_groups(tasks: Sequence[str], id_task: str | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The shift groups of a run's tasks: benchmark (or ID task) -> (ID task, its tasks, ID first), by the
    run's own rule (:func:`~lmms_emi.pipeline.run.plan_run`)."""
    return dict(plan_run(list(tasks), id_task).groups)


def count_cells(
    n_spaces: int, mi_estimators: Sequence[str], jsd_estimators: Sequence[str], n_groups: int
) -> int:
    """Cells of both tables: spaces × MI estimators × (1 + JSD estimators × groups)."""
    return n_spaces * len(mi_estimators) * (1 + len(jsd_estimators) * n_groups)


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _task_emi(estimator: Any, embeddings: Mapping[str, TaskEmbeddings]) -> dict[str, float | None]:
    """EMI of every task (None without references or responses), as :func:`analyze_shift` computes it."""
    out: dict[str, float | None] = {}
    for task, emb in embeddings.items():
        if emb.z_model is None or emb.z_ref is None:
            out[task] = None
            continue
        try:
            out[task] = emi_lib.task_emi(emi_lib.prepare_task(estimator, emb, task)).emi
        except ValueError as exc:
            raise ValueError(f"task {task!r}: {exc}") from None
    return out


def space_cells(
    space: str,
    embeddings: Mapping[str, TaskEmbeddings],
    win_rates: Mapping[str, float],
    *,
    groups: Mapping[str, tuple[str, Sequence[str]]],
    mi_estimators: Sequence[str],
    jsd_estimators: Sequence[str],
    fit: FitSettings = FitSettings(),
    on_cell: Callable[[str], None] | None = None,
) -> tuple[list[AgreementCell], list[BoundCell]]:
    """The Table 4 and Table 5 cells of one space (see the module docstring). ``embeddings``: every task of
    the run in the run's order (the pooled fit follows it); ``win_rates``: the judged tasks' WR;
    ``groups``: name -> (ID task, its tasks). ``on_cell(label)`` is called after each cell (a progress
    bar)."""
    done = on_cell or (lambda _label: None)
    table4: list[AgreementCell] = []
    table5: list[BoundCell] = []
    for mi in mi_estimators:
        started = time.perf_counter()
        estimator: Any = None
        try:
            estimator = fit_pooled_estimator(
                embeddings,
                seed=fit.seed,
                steps=fit.steps,
                progress=False,
                patience=fit.patience,
                method=fit.method,
                mi_estimator=mi,
            )
            emi = _task_emi(estimator, embeddings)
            rows = [t for t in embeddings if emi.get(t) is not None and win_rates.get(t) is not None]
            stat = agreement([emi[t] for t in rows], [win_rates[t] for t in rows], rows, n_resamples=0)
            table4.append(
                AgreementCell(
                    space, mi, len(rows), None if stat is None else stat.spearman_rho,
                    None if stat is None else stat.spearman_p, time.perf_counter() - started,
                    tuple(rows), emi,
                    None if stat is not None else f"{len(rows)} task(s) with EMI and a win rate (needs 3)",
                )
            )  # fmt: skip
        except (LmmsEmiError, ValueError) as exc:
            table4.append(
                AgreementCell(space, mi, 0, None, None, time.perf_counter() - started, error=_reason(exc))
            )
        done(f"{space} × {mi}")
        for jsd in jsd_estimators:
            for name, (id_task, tasks) in groups.items():
                table5.append(
                    _bound_cell(space, jsd, mi, name, id_task, tasks, embeddings, estimator, fit.seed)
                )
                done(f"{space} × {mi} × {jsd}")
    return table4, table5


def _bound_cell(
    space: str,
    jsd: str,
    mi: str,
    group: str,
    id_task: str,
    tasks: Sequence[str],
    embeddings: Mapping[str, TaskEmbeddings],
    estimator: Any,
    seed: int,
) -> BoundCell:
    """One Table 5 cell: the shift analysis of ``group`` with ``estimator`` (None: its fit failed) and
    ``jsd``."""
    started = time.perf_counter()
    if estimator is None:
        return BoundCell(space, jsd, mi, group, id_task, 0, None, None, 0.0, error=f"the {mi} fit failed")
    try:
        result = analyze_shift(
            {t: embeddings[t] for t in tasks}, id_task, estimator, n_resamples=0, seed=seed, jsd_estimator=jsd
        )
    except (LmmsEmiError, ValueError) as exc:
        return BoundCell(
            space, jsd, mi, group, id_task, 0, None, None, time.perf_counter() - started, error=_reason(exc)
        )
    corr = result.correlations.get("bound")
    rows = [t for t in result.ood_tasks if t.emid is not None and t.bound is not None]
    return BoundCell(
        space,
        jsd,
        mi,
        group,
        id_task,
        len(rows),
        None if corr is None else corr.pearson_r,
        None if corr is None else corr.pearson_p,
        time.perf_counter() - started,
        {t.task: t.emid for t in rows},
        {t.task: t.bound for t in rows},
        None if corr is not None else f"{len(rows)} shifted task(s) with EMID and a bound (needs 3)",
    )


def ablate(
    spaces: Mapping[str, Mapping[str, TaskEmbeddings]],
    win_rates: Mapping[str, float],
    *,
    mi_estimators: Sequence[str] = tuple(MI_ESTIMATORS),
    jsd_estimators: Sequence[str] = tuple(JSD_ESTIMATORS),
    groups: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    fit: FitSettings = FitSettings(),
    space_info: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> Ablation:
    """Both tables over every space of ``spaces`` (name -> the run's tasks' embeddings, in the run's
    order): see the module docstring. ``groups``: the run's shift groups (default :func:`run_groups` of the
    first space's tasks); ``space_info``: what the report says of each space (its encoder spec, where its
    embeddings came from). A tqdm bar counts the cells."""
    from tqdm.auto import tqdm

    check_names(mi_estimators, jsd_estimators)
    if not spaces:
        raise UsageError("no embedding space to ablate over")
    if not any(w is not None for w in win_rates.values()):
        raise UsageError("no task has a judge win rate: nothing to compare EMI with")
    first = next(iter(spaces.values()))
    chosen = {k: (i, tuple(t)) for k, (i, t) in (groups or run_groups(list(first))).items()}
    warnings: list[str] = []
    for name, embeddings in spaces.items():
        missing = [t for _k, (_i, tasks) in chosen.items() for t in tasks if t not in embeddings]
        if missing:
            raise UsageError(f"space {name}: no embeddings of task {missing[0]!r}")
    if not chosen:
        warnings.append("no shift group (an ID task with shifted tasks): Table 5 has no cells")
    total = count_cells(len(spaces), mi_estimators, jsd_estimators, len(chosen))
    table4: list[AgreementCell] = []
    table5: list[BoundCell] = []
    with tqdm(total=total, desc="ablation cells", unit="cell", disable=not progress) as bar:

        def step(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)

        for name, embeddings in spaces.items():
            t4, t5 = space_cells(
                name,
                embeddings,
                win_rates,
                groups=chosen,
                mi_estimators=mi_estimators,
                jsd_estimators=jsd_estimators,
                fit=fit,
                on_cell=step,
            )
            table4 += t4
            table5 += t5
    rates = {t: float(w) for t, w in win_rates.items() if w is not None}
    info = {name: dict((space_info or {}).get(name, {})) for name in spaces}
    settings = {
        "fit": fit.to_dict(),
        "mi_estimators": list(mi_estimators),
        "jsd_estimators": list(jsd_estimators),
        "bound": "scale-adjusted: sqrt(D_v) + sqrt(D_t) + D_P^(1/4) + D_Q^(1/4)",
    }
    return Ablation(table4, table5, rates, info, chosen, settings, warnings)
