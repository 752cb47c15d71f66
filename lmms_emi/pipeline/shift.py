"""Shift analysis: EMI per task, EMID and bounds against the in-distribution task, and their correlations.

For the in-distribution (ID) task P and each out-of-distribution (OOD) task Q:

    EMI(T)      = Î(z_x; z_ŷ) − Î(z_x; z_y)          on task T (CLUB estimate, nats)
    EMID(P, Q)  = EMI(P) − EMI(Q)
    bound       = √D_v + √D_t + D_P^¼ + D_Q^¼        (scale-adjusted; D = RJSD)
    theorem     = Ĥ(√D_v + √D_t) + 8(D_P + D_Q)^¼     (Theorem 4.5, when an entropy scale Ĥ is given)
    partial     = √D_v + √D_t                         (needs no references)

and over the OOD tasks the Pearson r (the paper's headline check), Spearman ρ and Kendall τ between EMID and
its bound. The math lives in :mod:`lmms_emi.emi`; this module decides what to compute for which task.

Numbers computed on thin or degenerate data are kept but flagged: each :class:`TaskResult` carries
``warnings`` (fewer than :data:`MIN_INTERVAL_SAMPLES` samples: no interval; identical or all-zero
embeddings of a role; an estimator whose μ(x) is constant or whose log σ²(x) sits at its ±1 bound; EMI 0 on
every task; empty responses, from :func:`response_warnings`).

Numbers the math rules out are refused, not flagged: every task's numbers are checked against the range
derived in :func:`lmms_emi.emi.implausible` (from the estimator's |μ| on the task's queries and the RJSD
range [0, ln 2]), and one outside it is an :class:`~lmms_emi.errors.ImplausibleResultError` naming the
estimator and the task, before any result leaves :func:`analyze_shift`.

Over 400 lines: the result types (:class:`TaskResult`, :class:`ShiftAnalysis`) and the flags raised on them
live beside the one function that fills them, :func:`analyze_shift`.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy import stats

from lmms_emi import emi as emi_lib
from lmms_emi import scenarios as sc
from lmms_emi.config import ESTIMATE, EMIConfig, valid_entropy_scale
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import ImplausibleResultError, UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.estimators.families import DEFAULT_JSD_ESTIMATOR, JSD_ESTIMATORS, JSD_RANGES, mi_estimator_name
from lmms_emi.pipeline.estimator import EstimatorInfo

__all__ = [
    "MIN_INTERVAL_SAMPLES",
    "AnalysisSettings",
    "Correlation",
    "ShiftAnalysis",
    "TaskResult",
    "analyze_shift",
    "correlate",
    "json_ready",
    "response_warnings",
    "shift_kind",
    "task_seed",
]


#: Below this many samples a task gets no bootstrap interval (null, with a warning): a percentile bootstrap
#: of 4 samples has at most 35 distinct resamples, and its "95% interval" is noise.
MIN_INTERVAL_SAMPLES = 5
_ZERO_TOL = 1e-9  # |MI| below this (nats) counts as exactly 0
_LOGVAR_BOUND = 0.9999  # |log σ²| above this: the Tanh of p_logvar is saturated


@dataclass(frozen=True)
class AnalysisSettings:
    """How the numbers of a run are computed: the bound's entropy scale Ĥ (None: scale-adjusted form;
    "estimate": estimated by the run pipeline from the samples' token log-probabilities, then a number),
    bootstrap resamples (0: no intervals), the intervals' confidence level, the seed and the JSD estimator
    of the bound's divergence terms (:data:`~lmms_emi.estimators.families.JSD_ESTIMATORS`)."""

    entropy_scale: float | str | None = None
    n_resamples: int = 1000
    confidence_level: float = 0.95
    seed: int = 0
    jsd_estimator: str = DEFAULT_JSD_ESTIMATOR

    def __post_init__(self) -> None:
        if not valid_entropy_scale(self.entropy_scale):
            raise UsageError(
                f"the entropy scale must be a finite number >= 0 or {ESTIMATE!r}, got {self.entropy_scale!r}"
            )
        if self.n_resamples < 0:
            raise UsageError(f"the number of bootstrap resamples must be >= 0, got {self.n_resamples}")
        if not 0 < self.confidence_level < 1:
            raise UsageError(f"the confidence level must be in (0, 1), got {self.confidence_level}")
        if self.jsd_estimator not in JSD_ESTIMATORS:
            raise UsageError(
                f"the JSD estimator must be one of {', '.join(JSD_ESTIMATORS)}, got {self.jsd_estimator!r}"
            )

    @classmethod
    def from_config(cls, config: EMIConfig) -> AnalysisSettings:
        """The analysis settings of a run's configuration."""
        return cls(
            config.entropy_scale,
            config.bootstrap,
            config.confidence,
            config.seed,
            jsd_estimator=config.jsd_estimator,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
def shift_kind(task: str, id_task: str, kinds: Mapping[str, str] | None = None) -> str:
    """ "id" for the ID task, else the kind ``kinds`` records for the task (a user's family), else the
    scenario's shift kind ("visual", "text", "joint"), else "ood"."""
    if task == id_task:
        return "id"
    if kinds and kinds.get(task) in sc.SHIFT_KINDS:
        return kinds[task]
    scenario = sc.scenario_for_task(task)
    if scenario is None:
        scenario = sc.parse_split(task)
    if scenario is None or scenario.is_id:
        return "ood"
    return scenario.shift_kind


@dataclass(frozen=True)
class Correlation:
    """Correlation between EMID and a bound over the OOD tasks (p-values two-sided)."""

    n_tasks: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    kendall_tau: float
    kendall_p: float
    tasks: tuple[str, ...] = ()


def correlate(x: Sequence[float], y: Sequence[float], tasks: Sequence[str] = ()) -> Correlation | None:
    """Pearson, Spearman and Kendall correlations via scipy.stats; None with fewer than 3 points.

    A constant series gives NaN coefficients (correlation undefined), reported as None in ``to_dict``.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    if len(x) < 3:
        return None
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: reported as NaN
        pr = stats.pearsonr(xa, ya)
        sr = stats.spearmanr(xa, ya)
        kt = stats.kendalltau(xa, ya)
    return Correlation(
        n_tasks=len(xa),
        pearson_r=float(pr.statistic),
        pearson_p=float(pr.pvalue),
        spearman_rho=float(sr.statistic),
        spearman_p=float(sr.pvalue),
        kendall_tau=float(kt.statistic),
        kendall_p=float(kt.pvalue),
        tasks=tuple(tasks),
    )


@dataclass(frozen=True)
class TaskResult:
    """Numbers of one task. EMID, bounds and JSD terms are relative to the ID task (None on the ID row);
    EMI fields are None when the task has no references or no responses, intervals None below
    :data:`MIN_INTERVAL_SAMPLES`. ``warnings``: why the numbers may not mean what they say (see the module
    docstring); empty for a clean task."""

    task: str
    shift_kind: str
    n: int
    emi: float | None = None
    mi_model: float | None = None
    mi_ref: float | None = None
    emi_ci: tuple[float, float] | None = None
    emid: float | None = None
    emid_ci: tuple[float, float] | None = None
    bound: float | None = None
    bound_theorem: float | None = None
    partial_bound: float | None = None
    jsd_visual: float | None = None
    jsd_text: float | None = None
    jsd_response_p: float | None = None
    jsd_response_q: float | None = None
    warnings: tuple[str, ...] = ()

    @property
    def is_id(self) -> bool:
        return self.shift_kind == "id"


def json_ready(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become None, tuples lists, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _bound_rows(results: Sequence[TaskResult], name: str) -> list[TaskResult]:
    """The OOD tasks with an EMID and a value of the bound ``name``: the points of r(EMID, bound)."""
    return [t for t in results if not t.is_id and t.emid is not None and getattr(t, name) is not None]


@dataclass(frozen=True)
class ShiftAnalysis:
    """EMI of every task, EMID and bounds of every OOD task against ``id_task``, and the correlations.

    ``correlations`` maps the bound's name ("bound", "partial_bound", and "bound_theorem" when an entropy
    scale was given) to its :class:`Correlation` with EMID over the OOD tasks, or None (fewer than 3).
    ``estimators``: which MI and JSD estimators made the numbers ({"mi": "club", "jsd": "rjsd"} by default).
    """

    id_task: str
    tasks: tuple[TaskResult, ...]
    correlations: dict[str, Correlation | None]
    settings: dict[str, Any] = field(default_factory=dict)
    estimator: EstimatorInfo | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    estimators: dict[str, str] = field(default_factory=dict)

    @property
    def correlation(self) -> Correlation | None:
        """EMID vs the scale-adjusted bound: the paper's headline check."""
        return self.correlations.get("bound")

    def correlation_over(self, name: str, tasks: Collection[str]) -> Correlation | None:
        """EMID vs the bound ``name`` over the OOD tasks among ``tasks`` (a group's subtasks): the stored
        correlation when they are all of them, else the same statistic over the subset."""
        rows = _bound_rows(self.tasks, name)
        chosen = [t for t in rows if t.task in tasks]
        if len(chosen) == len(rows):
            return self.correlations.get(name)
        return correlate(
            [t.emid for t in chosen], [getattr(t, name) for t in chosen], [t.task for t in chosen]
        )

    def task(self, name: str) -> TaskResult:
        for t in self.tasks:
            if t.task == name:
                return t
        raise KeyError(name)

    @property
    def ood_tasks(self) -> list[TaskResult]:
        return [t for t in self.tasks if not t.is_id]

    def with_context(
        self, *, estimator: EstimatorInfo | None = None, metadata: Mapping[str, Any] | None = None
    ) -> ShiftAnalysis:
        """A copy carrying the estimator info and extra metadata (model name, run dir, ...)."""
        merged = {**self.metadata, **dict(metadata or {})}
        return replace(self, estimator=estimator or self.estimator, metadata=merged)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and deterministic for a seed (no timestamps)."""
        return json_ready(
            {
                "id_task": self.id_task,
                "settings": self.settings,
                "estimators": self.estimators,
                "estimator": None if self.estimator is None else self.estimator.to_dict(),
                "metadata": self.metadata,
                "tasks": [asdict(t) for t in self.tasks],
                "correlations": {k: None if v is None else asdict(v) for k, v in self.correlations.items()},
            }
        )


def task_seed(seed: int, task: str) -> int:
    """Per-task bootstrap seed: independent of task order and of PYTHONHASHSEED."""
    return (seed * 1_000_003 + zlib.crc32(task.encode())) % (2**32)


def _with_task(task: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(f"task {task!r}: {exc}") from None


def response_warnings(samples: Mapping[str, Sequence[Any]]) -> dict[str, list[str]]:
    """Per task, a warning when responses (``.response`` of each sample) are empty or whitespace only."""
    notes: dict[str, list[str]] = {}
    for task, rows in samples.items():
        answers = [s.response for s in rows if s.response is not None]
        blank = sum(1 for a in answers if not str(a).strip())
        if answers and blank == len(answers):
            notes[task] = [
                f"all {blank} responses are empty or whitespace: EMI measures nothing of the model"
            ]
        elif blank:
            notes[task] = [f"{blank} of {len(answers)} responses are empty or whitespace"]
    return notes


_ROLES = (("z_v", "image-query"), ("z_t", "text-query"), ("z_model", "response"), ("z_ref", "reference"))


def _embedding_warnings(emb: TaskEmbeddings) -> list[str]:
    """Roles whose embeddings are all the same vector (flagged); all zero is a ValueError (refused)."""
    out = []
    for attr, role in _ROLES:
        z = getattr(emb, attr)
        if z is None:
            continue
        z = torch.as_tensor(z).to(torch.float64)
        scale = float(z.abs().max()) if z.numel() else 0.0
        if scale == 0.0:  # no direction at all: the divergences are undefined, so refuse
            raise ValueError(
                f"all {z.shape[0]} {role} embeddings are zero (a broken encoder or blank inputs?); "
                "nothing can be estimated from them"
            )
        if float((z - z[:1]).abs().max()) <= 1e-6 * scale:
            out.append(f"all {z.shape[0]} {role} embeddings are identical")
    return out


def _estimator_warnings(task: emi_lib.PreparedTask | emi_lib.PreparedCriticTask) -> list[str]:
    """An estimator degenerate on these queries: constant μ(x), or log σ²(x) pinned at its upper bound (a
    critic: constant scores)."""
    if isinstance(task, emi_lib.PreparedCriticTask):
        scores = torch.stack([task.scores_model, task.scores_ref])
        if float(scores.max() - scores.min()) <= 1e-6 * max(1.0, float(scores.abs().max())):
            return [
                f"the {task.club.bound} critic's scores are constant over this task, so every MI estimate is "
                "the bound's value at a constant critic (an untrained or corrupt estimator?)"
            ]
        return []
    mu, logvar = task.mu, task.logvar
    out = []
    spread = float((mu - mu.mean(dim=0)).abs().max())
    if spread <= 1e-6 * max(1.0, float(mu.abs().max())):
        out.append(
            "the estimator's μ(x) is constant over this task's queries, so every MI estimate is 0 "
            "(a corrupt or untrained estimator?)"
        )
    # Only the upper bound: a fit on L2-normalised embeddings wants per-dimension variances near 1/d, far
    # below e^-1, so log σ² resting at its lower bound -1 is the normal state of a good estimator.
    saturated = float((logvar > _LOGVAR_BOUND).to(torch.float64).mean())
    if saturated > 0.99:
        out.append(
            f"the estimator's log σ²(x) sits at its upper bound +1 for {saturated:.1%} of entries: q(y|x) is "
            "as wide as the model allows (an untrained or corrupt estimator?)"
        )
    return out


def _estimator_label(club: CLUB | CriticMI, info: EstimatorInfo | None) -> str:
    """How errors name the estimator: its registered name or file, else "the estimator"."""
    if info is not None and info.source == "fitted":
        return "the estimator fitted on this run"
    if info is not None and (info.name or info.path):
        return f"estimator {info.name or info.path}"
    if getattr(club, "fit_info_", None) is not None:  # fitted (after any load)
        return "the estimator fitted on this run"
    source = getattr(club, "source_", None)  # set by CLUB.from_checkpoint
    return f"estimator {source}" if source else "the estimator"


def _refuse_implausible(task: str, label: str, problem: str | None) -> None:
    if problem is not None:
        raise ImplausibleResultError(
            f"{label} gives task {task!r} an impossible result: {problem}; nothing is reported (a corrupt "
            "estimator? check or replace it, e.g. re-train with lmms-emi train-estimator)"
        )


def _spread(task: emi_lib.PreparedTask) -> tuple[float, float]:
    """(largest |μ(z_x)|, largest |log σ²(z_x)|) over a task's queries: what :func:`emi_lib.implausible`
    derives its ranges from."""
    mu, logvar = task.mu.detach().to(torch.float64), task.logvar.detach().to(torch.float64)
    mu_norm = float(mu.norm(dim=1).max()) if mu.numel() else 0.0
    logvar_abs = float(logvar.abs().max()) if logvar.numel() else 0.0
    return mu_norm, logvar_abs


_CHECKED_FIELDS = (
    "emi", "mi_model", "mi_ref", "emi_ci", "emid", "emid_ci", "bound", "bound_theorem", "partial_bound",
    "jsd_visual", "jsd_text", "jsd_response_p", "jsd_response_q",
)  # fmt: skip


def analyze_shift(
    task_embeddings: Mapping[str, TaskEmbeddings],
    id_task: str,
    club: CLUB | CriticMI,
    *,
    entropy_scale: float | None = None,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
    notes: Mapping[str, Sequence[str]] | None = None,
    estimator: EstimatorInfo | None = None,
    jsd_estimator: str = DEFAULT_JSD_ESTIMATOR,
    shift_kinds: Mapping[str, str] | None = None,
    entropy_estimate: Mapping[str, Any] | None = None,
) -> ShiftAnalysis:
    """EMI per task, EMID / bounds per OOD task against ``id_task``, and their correlations.

    Confidence intervals are percentile bootstraps over samples with the estimator fixed, their replicates
    centred on the estimate (:func:`lmms_emi.emi.bootstrap_emi`; ``n_resamples=0`` skips them; a task below
    :data:`MIN_INTERVAL_SAMPLES` gets none). Tasks without references (or
    responses) get EMI None but still the partial bound. Each task's ``warnings`` start with ``notes[task]``
    (e.g. :func:`response_warnings`), then those of the module docstring.
    Raises ValueError naming the task for a task with fewer than 2 samples or inconsistent embeddings, and
    :class:`~lmms_emi.errors.ImplausibleResultError` naming the estimator (``estimator``, else the file it
    was loaded from) and the task for a number outside what the math allows
    (:func:`lmms_emi.emi.implausible`). ``club`` may be any MI estimator of
    :data:`~lmms_emi.estimators.families.MI_ESTIMATORS` (a critic: its intervals are the bound on resampled
    rows with the critic fixed; no μ-based range check); ``jsd_estimator`` makes the bound's divergence terms
    (RJSD, or MMD² with its range [0, 2] in the plausibility check). ``entropy_estimate``: how Ĥ was
    estimated when it was (:func:`lmms_emi.pipeline.run.analyze_run`), recorded in the settings.
    """
    if not (entropy_scale is None or isinstance(entropy_scale, (int, float))):
        raise ValueError(f"entropy_scale must be a number or None here, got {entropy_scale!r}")
    label = _estimator_label(club, estimator)
    if jsd_estimator not in JSD_ESTIMATORS:
        raise ValueError(f"unknown JSD estimator {jsd_estimator!r}: one of {', '.join(JSD_ESTIMATORS)}")
    if id_task not in task_embeddings:
        raise ValueError(
            f"ID task {id_task!r} is not among the tasks: {', '.join(task_embeddings) or 'none'}"
        )
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    for task, emb in task_embeddings.items():
        n = 0 if emb.z_v is None else int(torch.as_tensor(emb.z_v).shape[0])
        if n < 2:
            raise ValueError(f"task {task!r} has {n} sample(s); EMI and the bounds need at least 2")
    same = {task: _with_task(task, _embedding_warnings, emb) for task, emb in task_embeddings.items()}

    def resamples(*tasks: str) -> int:  # no interval when any task involved is too small
        return n_resamples if all(task_embeddings[t].n >= MIN_INTERVAL_SAMPLES for t in tasks) else 0

    emi_results: dict[str, emi_lib.EMIResult | None] = {}
    emi_cis: dict[str, tuple[float, float] | None] = {}
    prepared: dict[str, emi_lib.PreparedTask] = {}  # the estimator runs once per task, for every number
    for task, emb in task_embeddings.items():
        if emb.z_model is None or emb.z_ref is None:
            emi_results[task], emi_cis[task] = None, None
            continue
        prepared[task] = _with_task(task, emi_lib.prepare_task, club, emb, "task")
        if isinstance(prepared[task], emi_lib.PreparedTask):  # a corrupt CLUB is refused before any estimate
            mu_norm, logvar_abs = _spread(prepared[task])
            _refuse_implausible(task, label, emi_lib.implausible({}, mu_norm=mu_norm, logvar_abs=logvar_abs))
        emi_results[task] = emi_lib.task_emi(prepared[task])
        if resamples(task):
            ci = _with_task(
                task,
                emi_lib.bootstrap_emi,
                club,
                prepared[task],
                n_resamples=n_resamples,
                confidence_level=confidence_level,
                seed=task_seed(seed, task),
            )
            emi_cis[task] = (ci.low, ci.high)
        else:
            emi_cis[task] = None

    flags: dict[str, list[str]] = {task: list((notes or {}).get(task, ())) for task in task_embeddings}
    for task, emb in task_embeddings.items():
        if n_resamples and emb.n < MIN_INTERVAL_SAMPLES:
            flags[task].append(
                f"only {emb.n} samples: no bootstrap interval (needs at least {MIN_INTERVAL_SAMPLES})"
            )
        elif n_resamples and task_embeddings[id_task].n < MIN_INTERVAL_SAMPLES:
            flags[task].append(f"no EMID interval: the ID task {id_task} has too few samples")
        flags[task].extend(same[task])
        if task in prepared:  # the embeddings passed the EMI checks
            flags[task].extend(_estimator_warnings(prepared[task]))

    p_emi = emi_results[id_task]
    # every RJSD term against the ID task in one pass (each distinct sample's spectrum is computed once),
    # on the embeddings the estimator saw (validated and normalised once)
    checked = {task: prepared[task].emb if task in prepared else emb for task, emb in task_embeddings.items()}
    divergences = emi_lib.shift_divergences(
        checked[id_task],
        {task: emb for task, emb in checked.items() if task != id_task},
        jsd_estimator=jsd_estimator,
    )
    results: list[TaskResult] = []
    for task, emb in task_embeddings.items():
        emi_res = emi_results[task]
        base = {
            "task": task,
            "shift_kind": shift_kind(task, id_task, shift_kinds),
            "n": emb.n,
            "emi": None if emi_res is None else emi_res.emi,
            "mi_model": None if emi_res is None else emi_res.mi_model,
            "mi_ref": None if emi_res is None else emi_res.mi_ref,
            "emi_ci": emi_cis[task],
            "warnings": tuple(flags[task]),
        }
        if task == id_task:
            results.append(TaskResult(**base))
            continue
        terms = divergences[task]
        partial = terms.partial()
        extra: dict[str, Any] = {
            "partial_bound": partial.value,
            "jsd_visual": partial.jsd_visual,
            "jsd_text": partial.jsd_text,
        }
        if p_emi is not None and emi_res is not None:
            extra["emid"] = emi_lib.emid(p_emi, emi_res)
            if resamples(id_task, task):
                ci = _with_task(
                    task,
                    emi_lib.bootstrap_emid,
                    club,
                    prepared[id_task],
                    prepared[task],
                    n_resamples=n_resamples,
                    confidence_level=confidence_level,
                    seed=task_seed(seed, f"{id_task}->{task}"),
                )
                extra["emid_ci"] = (ci.low, ci.high)
            bound = terms.bound()
            extra.update(
                bound=bound.value,
                jsd_response_p=bound.jsd_response_p,
                jsd_response_q=bound.jsd_response_q,
            )
            if entropy_scale is not None:
                extra["bound_theorem"] = terms.bound(entropy_scale).value
        results.append(TaskResult(**base, **extra))

    with_emi = [r for r in emi_results.values() if r is not None]
    if with_emi and all(abs(r.mi_model) < _ZERO_TOL and abs(r.mi_ref) < _ZERO_TOL for r in with_emi):
        zero = "EMI is 0 on every task (every MI estimate is 0): the estimator is degenerate, not the model"
        results = [replace(t, warnings=(*t.warnings, zero)) if t.emi is not None else t for t in results]
    spreads = {task: _spread(p) for task, p in prepared.items() if isinstance(p, emi_lib.PreparedTask)}
    for t in results:  # every published number in the range the math allows, or nothing is published
        mu_norm = spreads[t.task][0] if t.task in spreads else None
        id_mu = spreads[id_task][0] if id_task in spreads and t.emid is not None else None
        values = {name: getattr(t, name) for name in _CHECKED_FIELDS}
        problem = emi_lib.implausible(
            values,
            mu_norm=mu_norm,
            id_mu_norm=id_mu,
            entropy_scale=entropy_scale,
            jsd_max=JSD_RANGES[jsd_estimator][1],
        )
        _refuse_implausible(t.task, label, problem)
    correlations: dict[str, Correlation | None] = {}
    names = ["bound", "partial_bound"] + (["bound_theorem"] if entropy_scale is not None else [])
    for name in names:
        rows = _bound_rows(results, name)
        correlations[name] = correlate(
            [t.emid for t in rows], [getattr(t, name) for t in rows], [t.task for t in rows]
        )
    settings = {
        "entropy_scale": entropy_scale,
        "n_resamples": n_resamples,
        "confidence_level": confidence_level,
        "seed": seed,
    }
    if entropy_estimate is not None:
        settings["entropy_scale_estimate"] = dict(entropy_estimate)
    methods = {"mi": mi_estimator_name(club), "jsd": jsd_estimator}
    return ShiftAnalysis(id_task, tuple(results), correlations, settings, estimator, estimators=methods)
