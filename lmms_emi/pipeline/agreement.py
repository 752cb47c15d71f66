"""EMI against a judge: the judge step of the run pipeline and the agreement statistics (paper Table 2).

The step (:func:`judge_run`, called by :func:`lmms_emi.pipeline.run.analyze_run` when a
:class:`JudgeRun` is given) takes each task's (question, reference, response) records, reuses verdicts the
run already has (an lmms-eval samples log's judge scores), asks the judge for the rest, and computes

* per task: the win rate WR = mean 1[r(x, ŷ) > r(x, y)] (paper Eq. 2) and the relative score
  (mean r(ŷ) / mean r(y) × 100, lmms-eval's llava-bench aggregate) over the *scored* samples; samples the
  judge could not score are counted and excluded;
* across tasks: Spearman ρ and Kendall τ between EMI and WR with scipy's p-values and percentile bootstrap
  intervals over tasks (``scipy.stats.bootstrap``, paired resampling of tasks), over all of the run's tasks
  and per benchmark;
* per sample, where it is well defined: CLUB's estimate is a mean of per-sample terms
  s_i(y) = log q(y_i|x_i) − 1/N Σ_j log q(y_j|x_i) (Î(X;Y) = mean_i s_i exactly), so EMI = mean_i e_i with
  e_i = s_i(ŷ) − s_i(y). Against the judge's preference d_i = r(ŷ_i) − r(y_i): Spearman(e, d), the
  point-biserial r between e and the win indicator, and the AUC P(e_win > e_not-win) (Mann-Whitney U).
  EMID and the bounds have no per-sample form (they compare two tasks' distributions), so they are not
  compared per sample;
* baselines (:data:`BASELINES`), judge-free scores computed on the run's own embeddings as task means over
  the same samples EMI uses, with the same Spearman ρ / Kendall τ against WR, so the report shows whether
  EMI agrees with the judge better than a cheap similarity does: CLIPScore = w·max(cos(z_v, z_ŷ), 0) with
  w = 2.5, RefCLIPScore = harmonic mean of CLIPScore and max(cos(z_ŷ, z_y), 0) (Hessel et al. 2021), and
  the response-reference cosine cos(z_ŷ, z_y) (as in BERTScore, on sentence vectors). They are CLIPScore's
  formulas, not CLIP's numbers: the image and response vectors are those of the run's encoders
  (:func:`baseline_space` says which space that is).

Over 400 lines: the judge step's result types and their serialisation sit beside the statistics that fill
them (EMI's and the baselines', computed by the same ``agreement``); the statistics themselves are scipy's
(``spearmanr``, ``kendalltau``, ``bootstrap``, ``mannwhitneyu``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy import stats

from lmms_emi import scenarios as sc
from lmms_emi.embed.encoders import JOINT_QUERY_FEATURES
from lmms_emi.emi import TaskEmbeddings, prepare_task, query_embedding
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.club_form import club_sample_contributions
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.judge import Judge, JudgeItem, Judgment, relative_score, win_rate
from lmms_emi.pipeline.shift import correlate, json_ready

__all__ = [
    "BASELINES",
    "CLIP_SCORE_WEIGHT",
    "MIN_TASKS",
    "Agreement",
    "JudgeAnalysis",
    "JudgeRun",
    "SampleAgreement",
    "TaskJudge",
    "agreement",
    "baseline_space",
    "clip_scores",
    "cosine_rows",
    "judge_run",
    "ref_clip_scores",
    "sample_agreement",
    "sample_contributions",
    "task_baselines",
]

MIN_TASKS = 3  # a rank correlation over fewer tasks means nothing
CLIP_SCORE_WEIGHT = 2.5  # Hessel et al. (2021): w in CLIP-S = w · max(cos, 0)
#: The judge-free baselines beside EMI: field of :class:`TaskJudge` -> label in the reports.
BASELINES: dict[str, str] = {
    "clip_score": "CLIPScore",
    "ref_clip_score": "RefCLIPScore",
    "response_reference_cosine": "cos(response, reference)",
}


@dataclass
class JudgeRun:
    """The judge input of a run: the client for samples without a verdict (None: only ``judgments``), the
    verdicts already had (by task), and the texts of tasks whose samples are not handed to the pipeline
    (embedded earlier)."""

    judge: Judge | None = None
    judgments: dict[str, list[Judgment]] = field(default_factory=dict)
    items: dict[str, list[JudgeItem]] = field(default_factory=dict)
    progress: bool = False

    @classmethod
    def from_records(
        cls,
        judge: Judge | None,
        records: Mapping[str, Sequence[Mapping[str, Any]]],
        *,
        progress: bool = False,
    ) -> JudgeRun:
        """The judge input of a run whose records are dicts (question, response, reference, doc_id; a
        missing doc_id is the row number)."""
        items: dict[str, list[JudgeItem]] = {}
        for task, rows in records.items():
            if rows and all(r.get("reference") is not None and r.get("response") is not None for r in rows):
                items[task] = [
                    JudgeItem(
                        task,
                        i if r.get("doc_id") is None else r["doc_id"],
                        str(r["question"]),
                        str(r["reference"]),
                        str(r["response"]),
                    )
                    for i, r in enumerate(rows)
                ]
        return cls(judge=judge, items=items, progress=progress)


@dataclass(frozen=True)
class TaskJudge:
    """One task's judge numbers."""

    task: str
    shift_kind: str
    emi: float | None
    win_rate: float | None
    relative_score: float | None
    n_scored: int
    n_excluded: int
    n_wins: int
    mean_ref_score: float | None
    mean_model_score: float | None
    source: str  # "judge", "log" or "judge+log"
    excluded_reasons: dict[str, int] = field(default_factory=dict)
    # baselines (task means over the task's samples, on the run's embeddings; None without the texts)
    clip_score: float | None = None
    ref_clip_score: float | None = None
    response_reference_cosine: float | None = None


@dataclass(frozen=True)
class Agreement:
    """Rank agreement of EMI and WR across tasks (p-values two-sided; intervals: percentile bootstrap)."""

    n_tasks: int
    spearman_rho: float
    spearman_p: float
    kendall_tau: float
    kendall_p: float
    spearman_ci: tuple[float, float] | None
    kendall_ci: tuple[float, float] | None
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class SampleAgreement:
    """Per-sample EMI contributions e_i against the judge (see the module docstring)."""

    n: int
    n_wins: int
    spearman_rho: float | None
    spearman_p: float | None
    pointbiserial_r: float | None
    pointbiserial_p: float | None
    auc: float | None
    auc_p: float | None


@dataclass
class JudgeAnalysis:
    """The judge side of a run: per task numbers, agreement over all tasks and per benchmark, per-sample
    agreement, the verdicts, and the cost beside the EMI pipeline's own time."""

    tasks: dict[str, TaskJudge]
    agreement: Agreement | None
    by_benchmark: dict[str, Agreement | None]
    samples: SampleAgreement | None
    judgments: dict[str, list[Judgment]]
    cost: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # each baseline's agreement with WR (the statistics EMI gets), over all tasks and per benchmark
    baselines: dict[str, Agreement | None] = field(default_factory=dict)
    baselines_by_benchmark: dict[str, dict[str, Agreement | None]] = field(default_factory=dict)
    baseline_space: str = ""  # which embeddings the baselines were computed on (baseline_space)

    @property
    def n_scored(self) -> int:
        return sum(t.n_scored for t in self.tasks.values())

    @property
    def n_excluded(self) -> int:
        return sum(t.n_excluded for t in self.tasks.values())

    def task_keys(self, task: str) -> dict[str, Any]:
        """``<metric>,none`` entries of one task for lmms-eval's results JSON (empty for an unjudged task)."""
        t = self.tasks.get(task)
        if t is None:
            return {}
        return json_ready(
            {
                "winrate,none": t.win_rate,
                "relative_score,none": t.relative_score,
                "judge_scored,none": t.n_scored,
                "judge_excluded,none": t.n_excluded,
            }
        )

    def to_dict(self, *, with_judgments: bool = False) -> dict[str, Any]:
        out = {
            "tasks": {k: asdict(v) for k, v in self.tasks.items()},
            "agreement": None if self.agreement is None else asdict(self.agreement),
            "by_benchmark": {k: None if v is None else asdict(v) for k, v in self.by_benchmark.items()},
            "samples": None if self.samples is None else asdict(self.samples),
            "n_scored": self.n_scored,
            "n_excluded": self.n_excluded,
            "cost": self.cost,
            "config": self.config,
            "warnings": list(self.warnings),
            "baselines": {k: None if v is None else asdict(v) for k, v in self.baselines.items()},
            "baselines_by_benchmark": {
                b: {k: None if v is None else asdict(v) for k, v in rows.items()}
                for b, rows in self.baselines_by_benchmark.items()
            },
            "baseline_space": self.baseline_space,
        }
        if with_judgments:
            out["judgments"] = {k: [j.to_dict() for j in v] for k, v in self.judgments.items()}
        return json_ready(out)


# ------------------------------------------------------------------------------------------ statistics
def _finite(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


def agreement(
    emi: Sequence[float],
    wr: Sequence[float],
    tasks: Sequence[str] = (),
    *,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> Agreement | None:
    """Spearman ρ and Kendall τ of (EMI, WR) over tasks with scipy's p-values, and percentile bootstrap
    intervals over tasks (paired resampling; ``n_resamples`` 0: none). None with fewer than
    :data:`MIN_TASKS` tasks. A constant series gives NaN (undefined)."""
    if len(emi) != len(wr):
        raise ValueError(f"{len(emi)} EMI values but {len(wr)} win rates")
    if len(emi) < MIN_TASKS:
        return None
    point = correlate(emi, wr, tasks)  # the run's one correlation step (scipy's statistics and p-values)
    x, y = np.asarray(emi, dtype=np.float64), np.asarray(wr, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples: NaN
        cis: list[tuple[float, float] | None] = [None, None]
        if n_resamples > 0:
            for k, fn in enumerate((stats.spearmanr, stats.kendalltau)):
                res = stats.bootstrap(
                    (x, y),
                    lambda a, b, fn=fn: fn(a, b).statistic,
                    paired=True,
                    vectorized=False,
                    n_resamples=n_resamples,
                    confidence_level=confidence_level,
                    method="percentile",
                    rng=np.random.default_rng(seed),
                )
                low, high = _finite(res.confidence_interval.low), _finite(res.confidence_interval.high)
                cis[k] = (low, high) if math.isfinite(low) and math.isfinite(high) else None
    return Agreement(
        n_tasks=point.n_tasks,
        spearman_rho=point.spearman_rho,
        spearman_p=point.spearman_p,
        kendall_tau=point.kendall_tau,
        kendall_p=point.kendall_p,
        spearman_ci=cis[0],
        kendall_ci=cis[1],
        tasks=tuple(tasks),
    )


@torch.no_grad()
def sample_contributions(club: CLUB | CriticMI, emb: TaskEmbeddings) -> np.ndarray:
    """e_i = s_i(ŷ) − s_i(y) with s_i(y) = log q(y_i|x_i) − 1/N Σ_j log q(y_j|x_i): the per-sample terms
    whose mean is the task's EMI (float64; rows L2-normalised as EMI normalises them). A critic estimator:
    its bound's per-sample terms (:meth:`~lmms_emi.estimators.critic_mi.CriticMI.sample_contributions`)."""
    if emb.z_model is None or emb.z_ref is None:
        raise ValueError("per-sample EMI needs both responses and references")
    if isinstance(club, CriticMI):
        checked = prepare_task(club, emb).emb
        z_x = (checked.z_v + checked.z_t) / 2
        model, ref = (club.sample_contributions(z_x, z) for z in (checked.z_model, checked.z_ref))
        return (model - ref).double().cpu().numpy()
    mu, logvar = club.conditional_params(query_embedding(emb.z_v, emb.z_t))
    targets = (emb.z_model, emb.z_ref)
    normalised = [torch.nn.functional.normalize(z.double().to(mu.device), dim=1) for z in targets]
    s_model, s_ref = club_sample_contributions(mu, logvar, normalised)
    return (s_model - s_ref).cpu().numpy()


def sample_agreement(contributions: Sequence[float], preferences: Sequence[float]) -> SampleAgreement | None:
    """Spearman(e, d), point-biserial(e, 1[d > 0]) and AUC of e for wins vs the rest (Mann-Whitney U, two
    sided). None with fewer than 3 samples; undefined parts (one class only, constant input) None."""
    e, d = np.asarray(contributions, dtype=np.float64), np.asarray(preferences, dtype=np.float64)
    if len(e) != len(d):
        raise ValueError(f"{len(e)} contributions but {len(d)} preferences")
    if len(e) < 3:
        return None
    wins = d > 0
    n_wins = int(wins.sum())

    def ok(v: Any) -> float | None:
        v = float(v)
        return v if math.isfinite(v) else None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = stats.spearmanr(e, d)
        pb = stats.pointbiserialr(wins.astype(float), e) if 0 < n_wins < len(e) else None
        mw = stats.mannwhitneyu(e[wins], e[~wins]) if 0 < n_wins < len(e) else None
    return SampleAgreement(
        n=len(e),
        n_wins=n_wins,
        spearman_rho=ok(sr.statistic),
        spearman_p=ok(sr.pvalue),
        pointbiserial_r=None if pb is None else ok(pb.statistic),
        pointbiserial_p=None if pb is None else ok(pb.pvalue),
        auc=None if mw is None else ok(mw.statistic / (n_wins * (len(e) - n_wins))),
        auc_p=None if mw is None else ok(mw.pvalue),
    )


# ------------------------------------------------------------------------------------------ baselines
def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """cos(a_i, b_i) = a_i·b_i / (‖a_i‖ ‖b_i‖) row by row, float64 (a zero row gives 0).

    >>> cosine_rows(torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [3.0, 4.0]])).tolist()
    [0.0, 1.0]
    """
    if a.shape != b.shape:
        raise ValueError(f"rows {tuple(a.shape)} and {tuple(b.shape)} differ in shape")
    an = torch.nn.functional.normalize(torch.as_tensor(a).double(), dim=1)
    bn = torch.nn.functional.normalize(torch.as_tensor(b).double(), dim=1)
    return (an * bn).sum(dim=1).cpu().numpy()


def clip_scores(z_image: torch.Tensor, z_response: torch.Tensor, w: float = CLIP_SCORE_WEIGHT) -> np.ndarray:
    """CLIP-S_i = w · max(cos(z_image_i, z_response_i), 0) (Hessel et al. 2021, w = 2.5).

    >>> clip_scores(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[3.0, 4.0], [-1.0, 0.0]])).tolist()
    [1.5, 0.0]
    """
    return w * np.maximum(cosine_rows(z_image, z_response), 0.0)


def ref_clip_scores(
    z_image: torch.Tensor, z_response: torch.Tensor, z_ref: torch.Tensor, w: float = CLIP_SCORE_WEIGHT
) -> np.ndarray:
    """RefCLIP-S_i = H(CLIP-S_i, max(cos(z_response_i, z_ref_i), 0)) with the harmonic mean
    H(a, b) = 2ab / (a + b) (0 when a + b = 0) (Hessel et al. 2021, one reference per sample).

    >>> ref_clip_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]]))
    array([1.04347826])
    """
    c = clip_scores(z_image, z_response, w)
    r = np.maximum(cosine_rows(z_response, z_ref), 0.0)
    total = c + r
    return np.divide(2.0 * c * r, total, out=np.zeros_like(total), where=total > 0)


def task_baselines(emb: TaskEmbeddings, w: float = CLIP_SCORE_WEIGHT) -> dict[str, float | None]:
    """The task means of the :data:`BASELINES` over all of a task's samples (the samples EMI averages over):
    CLIPScore on (z_v, z_ŷ), RefCLIPScore on (z_v, z_ŷ, z_y), cos(z_ŷ, z_y); None where the task has no
    responses (all three) or no references (the two that need one)."""
    out: dict[str, float | None] = dict.fromkeys(BASELINES)
    if emb.z_model is None or len(emb.z_model) == 0:
        return out
    out["clip_score"] = float(clip_scores(emb.z_v, emb.z_model, w).mean())
    if emb.z_ref is not None:
        out["ref_clip_score"] = float(ref_clip_scores(emb.z_v, emb.z_model, emb.z_ref, w).mean())
        out["response_reference_cosine"] = float(cosine_rows(emb.z_model, emb.z_ref).mean())
    return out


def baseline_space(encoder_spec: Mapping[str, Any] | None) -> str:
    """One sentence naming the embeddings the baselines use, from the run's encoder spec: CLIPScore's image
    side is z_v (the vision encoder's vector, or with a joint-query encoder the image-and-question vector),
    its text side and the reference side are the text encoder's vectors."""
    if not encoder_spec or "vision" not in encoder_spec or "text" not in encoder_spec:
        return "the run's image and response embeddings (encoders not recorded)"
    v, t = encoder_spec["vision"], encoder_spec["text"]
    image = f"`{v.get('name')}` ({v.get('feature')})"
    text = f"`{t.get('name')}` ({t.get('feature')}, layer {t.get('layer')})"
    if v.get("feature") in JOINT_QUERY_FEATURES:
        side = f"the joint image-and-question vector of {image}"
    else:
        side = f"the image vector of {image}"
    if "projection" in encoder_spec:
        side += " after its random projection"
    shared = v.get("name") == t.get("name")
    space = (
        "one model embeds both sides (a shared image-text space)"
        if shared
        else "the two sides come from different encoders, so cos(image, response) is a cross-space "
        "similarity, not CLIP's image-text score: it is CLIPScore's formula on this run's embeddings"
    )
    return (
        f"CLIPScore / RefCLIPScore use {side} against the response vector of {text}; {space}. "
        f"The reference terms compare two texts in the text encoder's space."
    )


# ------------------------------------------------------------------------------------------ the step
def items_of(task: str, samples: Sequence[Any]) -> list[JudgeItem] | None:
    """Judge items of a task's samples (anything with doc_id, question, response, reference), in doc_id
    order; None when the task has no references (nothing to judge against)."""
    rows = sorted(samples, key=lambda s: s.doc_id) if samples else []
    if not rows or any(s.reference is None or s.response is None for s in rows):
        return None
    return [JudgeItem(task, s.doc_id, str(s.question), str(s.reference), str(s.response)) for s in rows]


def _doc_order(rows: Mapping[Any, Any]) -> list[Any]:
    try:
        return sorted(rows)
    except TypeError:  # mixed id types
        return sorted(rows, key=str)


def _task_judge(task: str, kind: str, emi: float | None, rows: Sequence[Judgment]) -> TaskJudge:
    scored = [j for j in rows if j.scored]
    reasons = Counter((j.error or "").split(" (attempt")[0] for j in rows if not j.scored)
    sources = sorted({j.source for j in rows})
    return TaskJudge(
        task=task,
        shift_kind=kind,
        emi=emi,
        win_rate=win_rate(rows),
        relative_score=relative_score(rows),
        n_scored=len(scored),
        n_excluded=len(rows) - len(scored),
        n_wins=sum(bool(j.win) for j in scored),
        mean_ref_score=float(np.mean([j.ref_score for j in scored])) if scored else None,
        mean_model_score=float(np.mean([j.model_score for j in scored])) if scored else None,
        source="+".join(sources),
        excluded_reasons=dict(reasons),
    )


def judge_run(
    request: JudgeRun,
    samples: Mapping[str, Sequence[Any]],
    *,
    emi: Mapping[str, float | None],
    kinds: Mapping[str, str],
    club: CLUB,
    embeddings: Mapping[str, TaskEmbeddings],
    settings: Mapping[str, Any],
    emi_seconds: float,
    encoder_spec: Mapping[str, Any] | None = None,
) -> JudgeAnalysis:
    """The judge step over the run's tasks (``emi`` gives their order): verdicts from ``request.judgments``
    first, the judge for the rest; per-task WR, agreement, per-sample agreement, the baselines' agreement
    (on ``embeddings``; ``encoder_spec`` names their space in the report), cost."""
    notes: list[str] = []
    todo: list[JudgeItem] = []
    have: dict[str, dict[Any, Judgment]] = {}
    for task in emi:
        items = items_of(task, samples[task]) if task in samples else request.items.get(task)
        if items is None:
            notes.append(f"{task}: no references (or no texts) to judge against; no win rate")
            continue
        logged = {j.doc_id: j for j in request.judgments.get(task, [])}
        have[task] = {}
        for item in items:
            if item.doc_id in logged:
                have[task][item.doc_id] = logged[item.doc_id]
            else:
                todo.append(item)
    if todo and request.judge is None:
        tasks_missing = sorted({i.task for i in todo})
        notes.append(
            f"{len(todo)} sample(s) of {', '.join(tasks_missing)} have no judge verdict (no --judge)"
        )
        for item in todo:
            have[item.task].pop(item.doc_id, None)
        for task in tasks_missing:
            if not have[task]:
                del have[task]
        todo = []
    started = time.perf_counter()
    for j in request.judge.judge(todo, progress=request.progress) if todo else []:
        have[j.task][j.doc_id] = j
    judge_seconds = time.perf_counter() - started
    judgments = {t: [rows[k] for k in _doc_order(rows)] for t, rows in have.items()}
    per_task = {t: _task_judge(t, kinds.get(t, "ood"), emi.get(t), rows) for t, rows in judgments.items()}
    per_task = {  # the baselines, on the same embeddings EMI used
        t: replace(row, **task_baselines(embeddings[t])) if t in embeddings else row
        for t, row in per_task.items()
    }
    boot = {
        "n_resamples": int(settings.get("n_resamples", 1000)),
        "confidence_level": float(settings.get("confidence_level", 0.95)),
        "seed": int(settings.get("seed", 0)),
    }

    def over(names: Sequence[str], score: str = "emi") -> Agreement | None:
        """Agreement of one score (EMI or a baseline) with WR over the tasks that have both."""
        rows = [
            per_task[t]
            for t in names
            if per_task[t].win_rate is not None and getattr(per_task[t], score) is not None
        ]
        values = [getattr(r, score) for r in rows]
        return agreement(values, [r.win_rate for r in rows], [r.task for r in rows], **boot)

    by_benchmark: dict[str, list[str]] = {}
    for task in per_task:
        scenario = sc.scenario_for_task(task)
        if scenario is not None:
            by_benchmark.setdefault(scenario.benchmark, []).append(task)
    # per sample: e_i of every scored sample, pooled over tasks (one estimator: comparable across tasks)
    e_all: list[float] = []
    d_all: list[float] = []
    for task, rows in judgments.items():
        emb = embeddings.get(task)
        if emb is None or emb.z_model is None or emb.z_ref is None:
            continue
        ids = (
            [s.doc_id for s in samples[task]] if task in samples else [i.doc_id for i in request.items[task]]
        )
        order = {doc: i for i, doc in enumerate(sorted(ids))}  # embedding rows follow doc_id order
        e = sample_contributions(club, emb)
        for j in rows:
            if j.scored and j.doc_id in order:
                e_all.append(float(e[order[j.doc_id]]))
                d_all.append(float(j.model_score - j.ref_score))
    stats_ = request.judge.stats if request.judge is not None else None
    n_judged = sum(len(v) for v in judgments.values())
    called = len(todo) - (stats_.cache_hits if stats_ is not None else 0)
    tokens = None
    if stats_ is not None and stats_.usage_reported and called > 0:
        tokens = (stats_.prompt_tokens + stats_.completion_tokens) / called
    cost = {
        "judge_seconds": judge_seconds,
        "emi_seconds": emi_seconds,
        "samples": n_judged,
        "judge_seconds_per_sample": judge_seconds / called if called > 0 else None,
        "emi_seconds_per_sample": emi_seconds / n_judged if n_judged else None,
        "judge_calls": None if stats_ is None else stats_.calls,
        "judge_retries": None if stats_ is None else stats_.retries,
        "cache_hits": None if stats_ is None else stats_.cache_hits,
        "from_log": sum(j.source == "log" for rows in judgments.values() for j in rows),
        "tokens_per_sample": tokens,  # over the samples sent to the judge (retries included)
        "prompt_tokens": None if stats_ is None else stats_.prompt_tokens,
        "completion_tokens": None if stats_ is None else stats_.completion_tokens,
    }
    return JudgeAnalysis(
        tasks=per_task,
        agreement=over(list(per_task)),
        by_benchmark={b: over(names) for b, names in by_benchmark.items()},
        samples=sample_agreement(e_all, d_all),
        judgments=judgments,
        cost=cost,
        config={} if request.judge is None else request.judge.config.to_dict(),
        warnings=notes,
        baselines={b: over(list(per_task), b) for b in BASELINES},
        baselines_by_benchmark={
            name: {b: over(names, b) for b in BASELINES} for name, names in by_benchmark.items()
        },
        baseline_space=baseline_space(encoder_spec),
    )
