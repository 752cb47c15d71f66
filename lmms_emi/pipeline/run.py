"""The run pipeline: records -> embeddings -> estimator -> shift analysis, for every entry point.

``lmms-emi score``, ``lmms-emi analyze``, ``lmms-emi eval`` and plain lmms-eval runs only gather a run's
:class:`~lmms_emi.pipeline.records.Sample` records and call :func:`analyze_run`; the report writer then turns
the :class:`RunAnalysis` into files. The rules that decide a run's shape live here, once:

* tasks are grouped by benchmark; a benchmark whose ID task is in the run gets one shift analysis (tasks in
  :func:`lmms_emi.scenarios.run_order`: ID, visual, text, joint); without its ID task its tasks are
  analysed one by one (EMI
  only) and a warning says so; tasks of no benchmark are analysed one by one, unless the caller names an
  explicit ID task (``id_task``, one of those tasks): then they form one group keyed by that task's name,
  ID first and the others in the given order, so EMID and the bounds work for any family of the user's
  own tasks;
* the estimator is fitted (when the policy says so) on the pooled pairs of all tasks in that same order;
* ``--entropy-scale estimate``: Ĥ is estimated once per run, over every query of every task, from the
  samples' token log-probabilities (:func:`estimate_entropy`), before anything is embedded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lmms_emi import __version__
from lmms_emi import scenarios as sc
from lmms_emi.config import ESTIMATE
from lmms_emi.emi import TaskEmbeddings, estimate_entropy_scale, sequence_nll
from lmms_emi.errors import UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.pipeline.agreement import JudgeAnalysis, JudgeRun, judge_run
from lmms_emi.pipeline.estimator import EstimatorInfo, EstimatorPolicy, resolve_estimator
from lmms_emi.pipeline.records import Sample, embed_tasks
from lmms_emi.pipeline.shift import (
    AnalysisSettings,
    ShiftAnalysis,
    TaskResult,
    analyze_shift,
    response_warnings,
)

__all__ = [
    "MIN_SAMPLES",
    "RunAnalysis",
    "RunPlan",
    "analyze_run",
    "check_sizes",
    "estimate_entropy",
    "plan_run",
]

MIN_SAMPLES = 2  # EMI, its interval and the bounds need at least two samples per task


@dataclass(frozen=True)
class RunPlan:
    """How a run's tasks are analysed: ``groups`` maps a benchmark to (ID task, its tasks in order, ID
    first); ``singles`` are analysed alone; ``order`` is every task in pipeline order."""

    groups: dict[str, tuple[str, tuple[str, ...]]]
    singles: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def order(self) -> list[str]:
        return [t for _id, tasks in self.groups.values() for t in tasks] + list(self.singles)


def plan_run(tasks: Sequence[str], id_task: str | None = None) -> RunPlan:
    """Group ``tasks`` by benchmark with the ID rule of the module docstring; ``id_task`` (a task of no
    benchmark) makes the tasks of no benchmark one group against it (UsageError for a plugin task)."""
    if id_task is not None and sc.scenario_for_task(id_task) is not None:
        raise UsageError(
            f"ID task {id_task}: a LLaVA-Bench shift task always uses its benchmark's ID task; name one of "
            "your own tasks as the ID task"
        )
    by_benchmark: dict[str, list[sc.Scenario]] = {}
    singles: list[str] = []
    for task in tasks:
        scenario = sc.scenario_for_task(task)
        if scenario is None:
            singles.append(task)
        else:
            by_benchmark.setdefault(scenario.benchmark, []).append(scenario)
    groups: dict[str, tuple[str, tuple[str, ...]]] = {}
    warnings: list[str] = []
    own = list(dict.fromkeys(singles))  # the tasks of no benchmark
    for benchmark, members in by_benchmark.items():
        benchmark_id = sc.id_scenario(benchmark).task
        ordered = tuple(s.task for s in sorted(set(members), key=sc.run_order))
        if benchmark_id not in ordered:
            warnings.append(
                f"{benchmark}: the ID task {benchmark_id} is not in this run, so no EMID / bounds for "
                f"{len(ordered)} task(s)"
            )
            singles = [*ordered, *singles]
            continue
        groups[benchmark] = (benchmark_id, ordered)
    if id_task is not None and id_task in own:
        groups[id_task] = (id_task, (id_task, *[t for t in own if t != id_task]))
        singles = [t for t in singles if t not in own]
    elif id_task is not None and own:
        warnings.append(
            f"the ID task {id_task} is not in this run, so no EMID / bounds for {len(own)} task(s)"
        )
    return RunPlan(groups, tuple(dict.fromkeys(singles)), tuple(warnings))


@dataclass
class RunAnalysis:
    """Everything a run computes: one :class:`ShiftAnalysis` per benchmark that has its ID task
    (``benchmarks``), one single-task analysis per other task (``singles``), the estimator and where it
    came from, the embeddings, the encoder spec, and warnings for the user."""

    benchmarks: dict[str, ShiftAnalysis]
    singles: dict[str, ShiftAnalysis]
    estimator: EstimatorInfo
    club: CLUB
    embeddings: dict[str, TaskEmbeddings]
    encoder_spec: dict[str, Any]
    settings: AnalysisSettings
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    judge: JudgeAnalysis | None = None  # win rates and their agreement with EMI, when a judge step ran
    entropy_estimate: dict[str, Any] | None = None  # how Ĥ was estimated (--entropy-scale estimate)

    @property
    def analyses(self) -> dict[str, ShiftAnalysis]:
        """Report name (``emi_report_<benchmark or task>``) -> analysis."""
        return {f"emi_report_{key}": a for key, a in {**self.benchmarks, **self.singles}.items()}

    def analysis_for(self, task: str) -> ShiftAnalysis | None:
        for analysis in (*self.benchmarks.values(), *self.singles.values()):
            if any(t.task == task for t in analysis.tasks):
                return analysis
        return None

    def task_result(self, task: str) -> TaskResult:
        """The ``TaskResult`` of ``task`` (KeyError when the run did not analyse it)."""
        analysis = self.analysis_for(task)
        if analysis is None:
            raise KeyError(task)
        return analysis.task(task)


def check_sizes(sizes: Mapping[str, int]) -> None:
    for task, n in sizes.items():
        if n < MIN_SAMPLES:
            raise ValueError(
                f"task {task!r} has {n} sample(s); EMI and the bounds need at least {MIN_SAMPLES}"
            )


def estimate_entropy(samples: Mapping[str, Sequence[Sample]], tasks: Sequence[str]) -> dict[str, Any]:
    """Ĥ of Theorem 4.5 over every query of ``tasks``, from each sample's token log-probabilities of its
    response and of its reference (:func:`~lmms_emi.emi.estimate_entropy_scale`), with where it came from.

    UsageError naming the task and doc_id of the first sample without both lists of log-probabilities (or
    with one that is not a list of finite numbers <= 0).
    """
    response_nll: list[float] = []
    reference_nll: list[float] = []
    where: list[tuple[str, Any]] = []
    for task in tasks:
        if task not in samples:
            raise UsageError(
                f"task {task!r}: --entropy-scale {ESTIMATE} needs its samples' token log-probabilities, "
                "and this task was embedded earlier without its samples"
            )
        for sample in samples[task]:
            missing = [n for n in ("response_logprobs", "reference_logprobs") if getattr(sample, n) is None]
            if missing:
                raise UsageError(
                    f"task {task!r} doc_id {sample.doc_id!r}: --entropy-scale {ESTIMATE} needs "
                    f"{' and '.join(missing)} for every sample (the model's token log-probabilities, saved "
                    "with the responses); give a number instead, or leave the option out"
                )
            try:
                response_nll.append(sequence_nll(sample.response_logprobs))
                reference_nll.append(sequence_nll(sample.reference_logprobs))
            except ValueError as exc:
                raise UsageError(f"task {task!r} doc_id {sample.doc_id!r}: {exc}") from None
            where.append((task, sample.doc_id))
    h = estimate_entropy_scale(response_nll, reference_nll)
    task, doc_id = where[h.argmax]
    return {
        "value": h.value,
        "method": "max over queries of -log p(response|x) - log p(reference|x), token log-probabilities",
        "n_queries": h.n_queries,
        "task": task,
        "doc_id": doc_id,
        "response_nll": h.response_nll,
        "reference_nll": h.reference_nll,
    }


def analyze_run(
    samples: Mapping[str, Sequence[Sample]],
    *,
    embedder: Any,
    policy: EstimatorPolicy,
    settings: AnalysisSettings,
    metadata: Mapping[str, Any] | None = None,
    embeddings: Mapping[str, TaskEmbeddings] | None = None,
    estimator: tuple[CLUB, EstimatorInfo] | None = None,
    id_task: str | None = None,
    judge: JudgeRun | None = None,
    shift_kinds: Mapping[str, str] | None = None,
) -> RunAnalysis:
    """The one pipeline: embed every task's samples, resolve the estimator (``estimator`` when the caller
    already has it, else from ``policy``), and analyse each benchmark against its ID task and every other
    task alone (see the module docstring).

    The run's tasks are those of ``samples`` and then those of ``embeddings`` (tasks embedded earlier, whose
    samples need not be given again). ``id_task``: the explicit ID task of the tasks of no benchmark
    (:func:`plan_run`); ``shift_kinds``: the shift kind of tasks whose names do not say it (the user's own
    families, from their YAMLs' metadata). Raises ValueError naming the task for a task with fewer than 2
    samples or unusable samples. With ``judge``, the judge step follows (:mod:`.agreement`: win rates and
    their agreement with EMI); its cost is reported beside this pipeline's own time.
    """
    started = time.perf_counter()
    known = dict(embeddings or {})
    sizes = {t: len(rows) for t, rows in samples.items()} | {
        t: e.n for t, e in known.items() if t not in samples
    }
    if not sizes:
        raise ValueError("no EMI samples were recorded: no task of this run has the EMI metric")
    check_sizes(sizes)
    plan = plan_run(list(sizes), id_task)
    entropy = None
    if settings.entropy_scale == ESTIMATE:  # from the records: before anything is embedded
        entropy = estimate_entropy(samples, plan.order)
        settings = replace(settings, entropy_scale=entropy["value"])
    todo = {t: samples[t] for t in plan.order if t not in known}
    if todo:
        known.update(embed_tasks(embedder, todo))
    ordered = {t: known[t] for t in plan.order}
    spec = dict(embedder.encoder_spec())
    club, info = estimator if estimator is not None else resolve_estimator(policy, spec, ordered)
    meta = {"lmms_emi_version": __version__, **dict(metadata or {})}  # in every report: comparability
    kwargs = settings.to_dict()  # entropy_scale, n_resamples, confidence_level, seed
    kwargs["notes"] = response_warnings(samples)  # empty answers: flagged per task
    kwargs["estimator"] = info  # named in the refusal of an implausible number
    kwargs["shift_kinds"] = shift_kinds
    kwargs["entropy_estimate"] = entropy
    benchmarks: dict[str, ShiftAnalysis] = {}
    for benchmark, (id_task, tasks) in plan.groups.items():
        result = analyze_shift({t: ordered[t] for t in tasks}, id_task, club, **kwargs)
        benchmarks[benchmark] = result.with_context(estimator=info, metadata={**meta, "benchmark": benchmark})
    singles: dict[str, ShiftAnalysis] = {}
    for task in plan.singles:
        result = analyze_shift({task: ordered[task]}, task, club, **kwargs)
        singles[task] = result.with_context(estimator=info, metadata={**meta, "task": task})
    flagged = [
        f"{t.task}: {w}"
        for a in (*benchmarks.values(), *singles.values())
        for t in a.tasks
        for w in t.warnings
    ]
    run = RunAnalysis(
        benchmarks,
        singles,
        info,
        club,
        ordered,
        spec,
        settings,
        meta,
        [*plan.warnings, *flagged],
        entropy_estimate=entropy,
    )
    if judge is not None:
        emi_seconds = time.perf_counter() - started
        results = {t.task: t for a in (*benchmarks.values(), *singles.values()) for t in a.tasks}
        run.judge = judge_run(
            judge,
            samples,
            emi={t: results[t].emi for t in plan.order},
            kinds={t: results[t].shift_kind for t in plan.order},
            club=club,
            embeddings=ordered,
            settings=settings.to_dict(),
            emi_seconds=emi_seconds,
            encoder_spec=spec,  # names the embedding space of the baselines
        )
        run.warnings.extend(run.judge.warnings)
    return run
