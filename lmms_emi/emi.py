"""Effective mutual information (EMI), its difference across distributions (EMID), and EMID's upper bound.

Oh et al., "Understanding Multimodal LLMs Under Distribution Shifts: An Information-Theoretic Approach"
(ICML 2025). For one task (data distribution) with L2-normalised embeddings of the image query z_v, the
text query z_t, the model's response z_ŷ and a reference response z_y:

    z_x  = (z_v + z_t) / 2
    EMI  = Î(z_x; z_ŷ) − Î(z_x; z_y)                      (Î: the CLUB estimate, nats)
    EMID(P, Q) = EMI(P) − EMI(Q)                           (P: in-distribution task, Q: shifted task)

Upper bound on EMID (Theorem 4.5), with D = RJSD (a lower bound on the Jensen-Shannon divergence):

    Ĥ · (D(P_xv‖Q_xv)^½ + D(P_xt‖Q_xt)^½) + 8 · (D(P_ŷ‖P_y) + D(Q_ŷ‖Q_y))^¼

and the scale-adjusted form the paper's code reports (no entropy estimate Ĥ):

    D(P_xv‖Q_xv)^½ + D(P_xt‖Q_xt)^½ + D(P_ŷ‖P_y)^¼ + D(Q_ŷ‖Q_y)^¼.

Without references only the input terms D_v^½ + D_t^½ are available: a partial, label-free risk signal.
Ĥ = max_x [H(Q_{Y|x}) + H(P_θ(·|x))] can be given, or estimated from the model's token log-probabilities
(:func:`estimate_entropy_scale`).

Everything here is a pure function of tensors (plus a fitted CLUB: an unfitted one raises
:class:`~lmms_emi.errors.NotFittedError`), with no I/O. Bootstrap replicates reweight the rows of a task by
their resampling counts and evaluate every replicate's CLUB estimates at once through
:class:`~lmms_emi.estimators.club_form.WeightedEstimate`, the same closed form as the estimate, with the
pairs of a row's copies left out of the negative mean so that the replicates centre on the estimate
(:meth:`~lmms_emi.estimators.club_form.WeightedEstimate.resampled`).

Other MI estimators (InfoNCE, NWJ, MINE: :class:`~lmms_emi.estimators.critic_mi.CriticMI`) take the same
paths: :func:`prepare_task` scores every (query, response) and (query, reference) pair of a task once
(:class:`PreparedCriticTask`), Î is the fitted critic's bound on those N×N scores and a bootstrap replicate
is the same bound on the resampled rows with the critic fixed, a row's copies not among its negatives
(:func:`~lmms_emi.estimators.mi_bounds.resampled_bounds`). Other JSD estimators (MMD) replace RJSD in every
divergence term (``jsd_estimator=``, :data:`~lmms_emi.estimators.families.JSD_ESTIMATORS`).

Every number is checked against what the math allows before it is published (:func:`implausible`, with
the derivation); a value outside that range comes from a corrupt estimator or a numerical fault.

Over 400 lines on purpose: this is where EMI is computed, and EMI, EMID, the bounds, their bootstrap
intervals and their plausibility ranges share their validation and the per-task estimator terms; split
apart, each would import the others' internals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from lmms_emi.estimators import mi_bounds
from lmms_emi.estimators.checkpoint import MU_NORM_LIMIT
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.club_form import WeightedEstimate, club_mutual_information
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.estimators.families import JSD_ESTIMATORS
from lmms_emi.estimators.rjsd import DensityMatrix, rjsd_between

__all__ = [
    "BoundResult",
    "EMIResult",
    "EntropyScaleEstimate",
    "Interval",
    "PreparedCriticTask",
    "PreparedTask",
    "ShiftDivergences",
    "TaskEmbeddings",
    "bootstrap_emi",
    "bootstrap_emid",
    "effective_mutual_information",
    "emid",
    "emid_upper_bound",
    "estimate_entropy_scale",
    "implausible",
    "mi_limit",
    "partial_upper_bound",
    "prepare_task",
    "query_embedding",
    "sequence_nll",
    "shift_divergences",
    "task_emi",
]

#: Bootstrap replicates evaluated per call of the statistic (scipy's ``batch``).
BOOTSTRAP_BATCH = 256


def _as_matrix(z: torch.Tensor, name: str, *, min_rows: int = 2) -> torch.Tensor:
    """Validate a (n, d) embedding matrix and return it as float32; errors name the argument."""
    if z is None:
        raise ValueError(f"{name} is missing")
    z = torch.as_tensor(z)
    if z.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, dim) tensor, got shape {tuple(z.shape)}")
    if z.shape[0] < min_rows:
        raise ValueError(f"{name} has {z.shape[0]} rows; at least {min_rows} samples are needed")
    if not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} contains NaN or inf (first at row {bad})")
    return z.to(torch.float32)


def _normalised(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows (idempotent up to round-off)."""
    return F.normalize(z, p=2, dim=-1)


def query_embedding(z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """z_x = (ẑ_v + ẑ_t) / 2 of the L2-normalised image and text query embeddings."""
    z_v = _as_matrix(z_v, "z_v", min_rows=1)
    z_t = _as_matrix(z_t, "z_t", min_rows=1)
    if z_v.shape != z_t.shape:
        raise ValueError(f"z_v {tuple(z_v.shape)} and z_t {tuple(z_t.shape)} must have the same shape")
    return (_normalised(z_v) + _normalised(z_t)) / 2


@dataclass(frozen=True)
class TaskEmbeddings:
    """The embeddings of one task: image query, text query, model response, reference response.

    Unpacks as the 4-tuple ``(z_v, z_t, z_model, z_ref)``; ``z_model``/``z_ref`` may be None when a task
    has no responses / no references (only the reference-free partial bound is defined then).
    """

    z_v: torch.Tensor
    z_t: torch.Tensor
    z_model: torch.Tensor | None = None
    z_ref: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter((self.z_v, self.z_t, self.z_model, self.z_ref))

    @property
    def n(self) -> int:
        return int(self.z_v.shape[0])

    @property
    def query(self) -> torch.Tensor:
        return query_embedding(self.z_v, self.z_t)

    def subset(self, index: np.ndarray | torch.Tensor) -> TaskEmbeddings:
        """The rows ``index`` of every matrix (for resampling)."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return TaskEmbeddings(*(None if z is None else z[idx] for z in self))


def _task(emb: TaskEmbeddings | tuple, name: str) -> TaskEmbeddings:
    if isinstance(emb, TaskEmbeddings):
        return emb
    try:
        z_v, z_t, z_model, z_ref = emb
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be TaskEmbeddings or a (z_v, z_t, z_model, z_ref) tuple") from None
    return TaskEmbeddings(z_v, z_t, z_model, z_ref)


class _CheckedEmbeddings(TaskEmbeddings):
    """Embeddings that passed :func:`_check_task` (validated, L2-normalised): not checked again."""


def _check_task(emb: TaskEmbeddings, name: str, *, need_responses: bool) -> TaskEmbeddings:
    """Validate shapes and values of a task's embeddings; return them L2-normalised."""
    missing_responses = emb.z_model is None or emb.z_ref is None
    if isinstance(emb, _CheckedEmbeddings) and not (need_responses and missing_responses):
        return emb
    z_v = _as_matrix(emb.z_v, f"{name}.z_v")
    n, d = z_v.shape
    out = []
    for field_name, z in zip(("z_v", "z_t", "z_model", "z_ref"), emb, strict=True):
        if z is None:
            if need_responses or field_name in ("z_v", "z_t"):
                raise ValueError(f"{name}.{field_name} is missing")
            out.append(None)
            continue
        z = _as_matrix(z, f"{name}.{field_name}")
        if z.shape[0] != n:
            raise ValueError(f"{name}.{field_name} has {z.shape[0]} rows but {name}.z_v has {n}")
        if z.shape[1] != d:
            raise ValueError(f"{name}.{field_name} has dim {z.shape[1]} but {name}.z_v has dim {d}")
        out.append(_normalised(z))
    return _CheckedEmbeddings(*out)


# --------------------------------------------------------------------------------------------------------
# EMI and EMID
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EMIResult:
    """EMI = mi_model − mi_ref (nats) over ``n`` samples."""

    emi: float
    mi_model: float
    mi_ref: float
    n: int


@dataclass(frozen=True)
class PreparedTask:
    """A task ready for the estimator: its checked, L2-normalised embeddings, CLUB's μ(z_x) and log σ²(z_x),
    and (built on first use) the weighted estimate of both targets that bootstrap replicates evaluate.

    :func:`prepare_task` makes it once per task; :func:`task_emi`, :func:`bootstrap_emi` and
    :func:`bootstrap_emid` take it in place of the embeddings, so an analysis of many tasks runs the
    estimator and builds each task's bootstrap terms once, however many intervals involve the task."""

    club: CLUB
    emb: TaskEmbeddings
    mu: torch.Tensor
    logvar: torch.Tensor

    @cached_property
    def estimate(self) -> WeightedEstimate:
        """Î(w) of (z_ŷ, z_y) for row weights: (2, B) per (B, n) weights."""
        return WeightedEstimate(
            self.mu, self.logvar, (self.emb.z_model, self.emb.z_ref), n_sets=BOOTSTRAP_BATCH
        )

    def replicates(self, counts: torch.Tensor) -> torch.Tensor:
        """Bootstrap replicates of (Î(z_x; z_ŷ), Î(z_x; z_y)) for (B, n) resampling counts: (2, B), with
        CLUB's self-pairs at the estimate's share (:meth:`~lmms_emi.estimators.club_form.WeightedEstimate.
        resampled`)."""
        return self.estimate.resampled(counts)


@dataclass(frozen=True)
class PreparedCriticTask:
    """A task ready for a critic estimator (InfoNCE, NWJ, MINE): its checked embeddings and the critic's
    N×N scores S_ij = f(z_x_i, z_ŷ_j) and f(z_x_i, z_y_j), computed once for the estimate and every bootstrap
    replicate (the critic fixed; a replicate is the bound on the resampled rows,
    :func:`~lmms_emi.estimators.mi_bounds.weighted_bounds`)."""

    club: CriticMI
    emb: TaskEmbeddings
    scores_model: torch.Tensor
    scores_ref: torch.Tensor

    def replicates(self, counts: torch.Tensor) -> torch.Tensor:
        """Bootstrap replicates of (Î(z_x; z_ŷ), Î(z_x; z_y)) for (B, n) resampling counts: (2, B), the bound
        on the resampled rows with a row's copies not among its negatives
        (:func:`~lmms_emi.estimators.mi_bounds.resampled_bounds`)."""
        name = self.club.bound
        return torch.stack(
            [mi_bounds.resampled_bounds(name, s, counts) for s in (self.scores_model, self.scores_ref)]
        )


def prepare_task(
    club: CLUB | CriticMI,
    emb: TaskEmbeddings | tuple | PreparedTask | PreparedCriticTask,
    name: str = "task",
) -> PreparedTask | PreparedCriticTask:
    """Validate and normalise a task's embeddings (ValueError naming ``name`` and the field) and compute
    CLUB's μ(z_x), log σ²(z_x) for its queries z_x = (ẑ_v + ẑ_t)/2 (a critic estimator: its scores of every
    query against every response and reference, :class:`PreparedCriticTask`). A task already prepared for
    ``club`` is returned as it is."""
    if isinstance(emb, (PreparedTask, PreparedCriticTask)):
        if emb.club is not club:
            raise ValueError(f"{name} was prepared for another estimator")
        return emb
    checked = _check_task(_task(emb, name), name, need_responses=True)
    z_x = (checked.z_v + checked.z_t) / 2
    if z_x.shape[1] != club.x_dim or checked.z_model.shape[1] != club.y_dim:
        raise ValueError(
            f"{name}: embeddings are {z_x.shape[1]}-dim but the estimator takes x of dim {club.x_dim} "
            f"and y of dim {club.y_dim}"
        )
    if isinstance(club, CriticMI):
        return PreparedCriticTask(
            club, checked, club.scores(z_x, checked.z_model), club.scores(z_x, checked.z_ref)
        )
    mu, logvar = club.conditional_params(z_x)
    return PreparedTask(club, checked, mu, logvar)


def task_emi(task: PreparedTask | PreparedCriticTask, *, leave_one_out: bool = False) -> EMIResult:
    """EMI of a prepared task: Î(z_x; z_ŷ) − Î(z_x; z_y) (see :func:`effective_mutual_information`)."""
    if isinstance(task, PreparedCriticTask):
        if leave_one_out:
            raise ValueError("leave_one_out is a CLUB option; a critic's bound uses j ≠ i by construction")
        name = task.club.bound
        mi_model = mi_bounds.bound_from_scores(name, task.scores_model)
        mi_ref = mi_bounds.bound_from_scores(name, task.scores_ref)
        return EMIResult(emi=mi_model - mi_ref, mi_model=mi_model, mi_ref=mi_ref, n=task.emb.n)
    mi_model = club_mutual_information(task.mu, task.logvar, task.emb.z_model, leave_one_out=leave_one_out)
    mi_ref = club_mutual_information(task.mu, task.logvar, task.emb.z_ref, leave_one_out=leave_one_out)
    return EMIResult(emi=mi_model - mi_ref, mi_model=mi_model, mi_ref=mi_ref, n=task.emb.n)


def effective_mutual_information(
    club: CLUB,
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    z_model: torch.Tensor,
    z_ref: torch.Tensor,
    *,
    leave_one_out: bool = False,
) -> EMIResult:
    """EMI = Î(z_x; z_ŷ) − Î(z_x; z_y) with z_x = (ẑ_v + ẑ_t)/2; rows are L2-normalised here first.

    Î is the CLUB estimate (:func:`~lmms_emi.estimators.club_form.club_mutual_information`). When the model's
    responses are the references, EMI is exactly 0:

    >>> g = torch.Generator().manual_seed(0)
    >>> z_v, z_t, z_ref = (torch.randn(50, 4, generator=g) for _ in range(3))
    >>> club = CLUB(4, 4, 8).fit(torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g),
    ...                          steps=5, progress=False)
    >>> effective_mutual_information(club, z_v, z_t, z_ref, z_ref).emi
    0.0
    >>> r = effective_mutual_information(club, z_v, z_t, z_v + z_t, z_ref)
    >>> r.emi == r.mi_model - r.mi_ref, r.n
    (True, 50)
    """
    task = prepare_task(club, TaskEmbeddings(z_v, z_t, z_model, z_ref), "task")
    return task_emi(task, leave_one_out=leave_one_out)


def emid(p: EMIResult, q: EMIResult) -> float:
    """EMID(P, Q) = EMI(P) − EMI(Q): how much query-response relevance is lost going from P to Q.

    >>> p = EMIResult(emi=0.5, mi_model=0.9, mi_ref=0.4, n=90)
    >>> q = EMIResult(emi=0.2, mi_model=0.6, mi_ref=0.4, n=60)
    >>> emid(p, q)
    0.3
    """
    return p.emi - q.emi


# --------------------------------------------------------------------------------------------------------
# Upper bound
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoundResult:
    """An EMID upper bound and its RJSD terms (nats). Response terms are None for the partial bound."""

    value: float
    jsd_visual: float
    jsd_text: float
    jsd_response_p: float | None
    jsd_response_q: float | None
    form: str  # "scale_adjusted" | "theorem" | "partial" | "partial_theorem"


@dataclass(frozen=True)
class ShiftDivergences:
    """The RJSD terms between an in-distribution task P and a shifted task Q (nats).

    ``jsd_response_p``/``jsd_response_q`` (model vs reference responses) are None when a task lacks them.

    With D_v = 0.04, D_t = 0.09 (√: 0.2, 0.3) and D_P = 0.0016, D_Q = 0.0081 (⁴√: 0.2, 0.3):

    >>> terms = ShiftDivergences(jsd_visual=0.04, jsd_text=0.09, jsd_response_p=0.0016, jsd_response_q=0.0081)
    >>> terms.bound().value  # 0.2 + 0.3 + 0.2 + 0.3
    1.0
    >>> terms.partial().value, terms.partial(entropy_scale=2.0).value  # 0.2 + 0.3, and 2 · 0.5
    (0.5, 1.0)

    and the theorem's form with Ĥ = 2 and D_P = D_Q = 0.0008 (so ⁴√(D_P + D_Q) = ⁴√0.0016 = 0.2):

    >>> ShiftDivergences(0.04, 0.09, 0.0008, 0.0008).bound(entropy_scale=2.0).value  # 2 · 0.5 + 8 · 0.2
    2.6
    """

    jsd_visual: float
    jsd_text: float
    jsd_response_p: float | None
    jsd_response_q: float | None

    def _input_terms(self) -> float:
        """√D_v + √D_t: the input-shift part of both bounds."""
        return self.jsd_visual**0.5 + self.jsd_text**0.5

    def bound(self, entropy_scale: float | None = None) -> BoundResult:
        """Full EMID bound: √D_v + √D_t + D_P^¼ + D_Q^¼, or Ĥ(√D_v + √D_t) + 8(D_P + D_Q)^¼ given Ĥ."""
        if self.jsd_response_p is None or self.jsd_response_q is None:
            raise ValueError("the full bound needs model and reference responses for both tasks")
        inputs = self._input_terms()
        d_p, d_q = self.jsd_response_p, self.jsd_response_q
        if entropy_scale is None:
            value, form = inputs + d_p**0.25 + d_q**0.25, "scale_adjusted"
        else:
            value, form = _check_scale(entropy_scale) * inputs + 8.0 * (d_p + d_q) ** 0.25, "theorem"
        return BoundResult(value, self.jsd_visual, self.jsd_text, d_p, d_q, form)

    def partial(self, entropy_scale: float | None = None) -> BoundResult:
        """Reference-free part: √D_v + √D_t (times Ĥ when given)."""
        inputs = self._input_terms()
        if entropy_scale is None:
            return BoundResult(inputs, self.jsd_visual, self.jsd_text, None, None, "partial")
        value = _check_scale(entropy_scale) * inputs
        return BoundResult(value, self.jsd_visual, self.jsd_text, None, None, "partial_theorem")


def _check_scale(entropy_scale: float) -> float:
    if not entropy_scale >= 0:
        raise ValueError(f"entropy_scale must be non-negative, got {entropy_scale}")
    return float(entropy_scale)


@dataclass(frozen=True)
class EntropyScaleEstimate:
    """Ĥ of Theorem 4.5 estimated from token log-probabilities (nats), and the query that attains it."""

    value: float
    n_queries: int
    argmax: int  # position of the query attaining the max, in the order given
    response_nll: float  # −log p_θ(ŷ | x) at that query
    reference_nll: float  # −log p_θ(y | x) at that query


def sequence_nll(token_logprobs: Sequence[float]) -> float:
    """−log p(sequence) = −Σ_t log p(token_t | prefix, x), from per-token log-probabilities (nats).

    ValueError when a log-probability is not a finite number ≤ 0 (a probability above 1, or none at all).

    >>> sequence_nll([-0.5, -1.0, 0.0])
    1.5
    """
    values = np.asarray(token_logprobs, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError("token log-probabilities must be a flat list of numbers")
    bad = np.flatnonzero(~np.isfinite(values) | (values > 1e-6))  # 1e-6: round-off of a certain token
    if bad.size:
        raise ValueError(
            f"token log-probability {values[bad[0]]!r} at position {bad[0]} is not a finite number <= 0"
        )
    return float(-values.sum())


def estimate_entropy_scale(
    response_nll: Sequence[float] | torch.Tensor, reference_nll: Sequence[float] | torch.Tensor
) -> EntropyScaleEstimate:
    """Ĥ ≈ max_i [−log p_θ(y_i | x_i) − log p_θ(ŷ_i | x_i)] over the queries x_i, from the model's own
    negative log-likelihoods of each query's reference y_i and response ŷ_i (:func:`sequence_nll`).

    Theorem 4.5 needs Ĥ = max_x [H(Q_{Y|x}) + H(P_θ(·|x))]. Per query, both terms are one-sample estimates:

    * H(P_θ(·|x)) = E_{ŷ∼P_θ(·|x)}[−log p_θ(ŷ|x)]: the response's NLL, unbiased for a response sampled at
      temperature 1; a greedy (or low-temperature) response is among the likeliest, so its NLL tends to be
      below the entropy;
    * H(Q_{Y|x}) ≤ H(Q_{Y|x}) + KL(Q_{Y|x}‖P_θ(·|x)) = E_{y∼Q_{Y|x}}[−log p_θ(y|x)]: the reference's NLL
      under the model estimates this cross-entropy, an upper bound on the reference entropy.

    The maximum of noisy one-sample estimates is itself biased upward, the safe side for an upper bound. It is
    an estimate, not the theorem's exact Ĥ, and is labelled as one wherever it is reported.

    >>> h = estimate_entropy_scale([1.5, 0.1], [2.0, 0.5])  # sums 3.5 and 0.6
    >>> h.value, h.argmax, h.n_queries
    (3.5, 0, 2)
    """
    resp = torch.as_tensor(response_nll, dtype=torch.float64).reshape(-1)
    ref = torch.as_tensor(reference_nll, dtype=torch.float64).reshape(-1)
    if resp.numel() == 0 or resp.shape != ref.shape:
        raise ValueError(
            f"need one response and one reference NLL per query, got {resp.numel()} and {ref.numel()}"
        )
    if not (torch.isfinite(resp).all() and torch.isfinite(ref).all()) or (resp < 0).any() or (ref < 0).any():
        raise ValueError("negative log-likelihoods must be finite numbers >= 0")
    total = resp + ref
    best = int(torch.argmax(total))
    return EntropyScaleEstimate(
        float(total[best]), int(total.numel()), best, float(resp[best]), float(ref[best])
    )


def shift_divergences(
    p_emb: TaskEmbeddings | tuple,
    q_embs: Mapping[str, TaskEmbeddings | tuple],
    *,
    jsd_estimator: str = "rjsd",
) -> dict[str, ShiftDivergences]:
    """RJSD terms of P against each shifted task in ``q_embs`` (keyed by task name); ``jsd_estimator="mmd"``:
    MMD² terms instead (:func:`~lmms_emi.estimators.mmd.mmd_squared`, each pair computed once).

    Every sample's density matrix and every pair's divergence is computed once, by content: P's entropies
    and D(P_ŷ‖P_y) serve all Q, and Q tasks that share an input (the text variants of one visual shift share
    their images, the visual variants of one text shift their questions, all tasks their references) reuse
    its decompositions. The values are those of :func:`~lmms_emi.estimators.rjsd.rjsd` on each pair.
    """
    p = _check_task(_task(p_emb, "P"), "P", need_responses=False)
    memo = _DivergenceMemo(jsd_estimator)
    d_p = _response_divergence(p, memo)
    out = {}
    for name, q_emb in q_embs.items():
        q = _check_task(_task(q_emb, name), name, need_responses=False)
        if q.z_v.shape[1] != p.z_v.shape[1] or q.z_t.shape[1] != p.z_t.shape[1]:
            raise ValueError(f"{name}: embeddings have other dimensions than the in-distribution task's")
        out[name] = ShiftDivergences(
            jsd_visual=memo.divergence(p.z_v, q.z_v),
            jsd_text=memo.divergence(p.z_t, q.z_t),
            jsd_response_p=d_p,
            jsd_response_q=_response_divergence(q, memo),
        )
    return out


class _DivergenceMemo:
    """RJSD of sample pairs, with each distinct sample (compared in full, found by its shape and end rows)
    decomposed once and each pair's value kept."""

    def __init__(self, jsd_estimator: str = "rjsd") -> None:
        if jsd_estimator not in JSD_ESTIMATORS:
            raise ValueError(f"unknown JSD estimator {jsd_estimator!r}: one of {', '.join(JSD_ESTIMATORS)}")
        self._jsd = jsd_estimator
        self._kept: list[torch.Tensor] = []  # the samples themselves (any estimator but RJSD)
        self._samples: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self._densities: list[DensityMatrix] = []
        self._values: dict[tuple[int, int], float] = {}

    def _index(self, z: torch.Tensor) -> int:
        probe = (z.dtype, tuple(z.shape), tuple(z[0].tolist()), tuple(z[-1].tolist()))
        candidates = self._samples.setdefault(probe, [])
        for index, seen in candidates:
            if torch.equal(seen, z):
                return index
        candidates.append((len(self._kept), z))
        self._kept.append(z)
        if self._jsd == "rjsd":
            self._densities.append(DensityMatrix.of_sample(z))
        return len(self._kept) - 1

    def divergence(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The JSD estimator's value of (x, y): :func:`~lmms_emi.estimators.rjsd.rjsd` by default."""
        pair = self._index(x), self._index(y)
        if pair not in self._values:
            if self._jsd == "rjsd":
                value = rjsd_between(self._densities[pair[0]], self._densities[pair[1]])
            else:
                value = JSD_ESTIMATORS[self._jsd](self._kept[pair[0]], self._kept[pair[1]])
            self._values[pair] = value
        return self._values[pair]


def _response_divergence(emb: TaskEmbeddings, memo: _DivergenceMemo) -> float | None:
    if emb.z_model is None or emb.z_ref is None:
        return None
    return memo.divergence(emb.z_model, emb.z_ref)


def emid_upper_bound(
    p_emb: TaskEmbeddings | tuple,
    q_emb: TaskEmbeddings | tuple,
    entropy_scale: float | None = None,
) -> BoundResult:
    """Upper bound on EMID(P, Q) from RJSD terms.

    ``entropy_scale=None``: √D_v + √D_t + D_P^¼ + D_Q^¼ (the paper code's scale-adjusted form).
    ``entropy_scale=Ĥ``:   Ĥ(√D_v + √D_t) + 8(D_P + D_Q)^¼ (Theorem 4.5),
    with D_v = D(P_xv‖Q_xv), D_t = D(P_xt‖Q_xt), D_P = D(P_ŷ‖P_y), D_Q = D(Q_ŷ‖Q_y).
    For many shifted tasks against one P, :func:`shift_divergences` shares P's work.

    Example in 2 dims with e₁ ⟂ e₂: P's images are e₁ and Q's e₂ (D_v = ln 2, the largest RJSD), both
    ask the same questions (D_t = 0), P's responses are e₁ and its references e₂ (D_P = ln 2), and Q's
    responses are its references (D_Q = 0):

    >>> e1, e2 = [1.0, 0.0], [0.0, 1.0]
    >>> p = TaskEmbeddings(*map(torch.tensor, ([e1, e1], [e1, e2], [e1, e1], [e2, e2])))
    >>> q = TaskEmbeddings(*map(torch.tensor, ([e2, e2], [e1, e2], [e1, e2], [e1, e2])))
    >>> b = emid_upper_bound(p, q)
    >>> [round(d, 6) for d in (b.jsd_visual, b.jsd_text, b.jsd_response_p, b.jsd_response_q)]
    [0.693147, 0.0, 0.693147, 0.0]
    >>> ln2 = float(np.log(2))
    >>> round(b.value, 6), round(ln2**0.5 + ln2**0.25, 6)  # √ln 2 + ⁴√ln 2
    (1.744999, 1.744999)
    >>> round(emid_upper_bound(p, q, entropy_scale=2.0).value, 6)  # 2·√ln 2 + 8·⁴√ln 2 = 1.665109 + 7.299554
    8.964664
    """
    p = _check_task(_task(p_emb, "p_emb"), "p_emb", need_responses=True)
    q = _check_task(_task(q_emb, "q_emb"), "q_emb", need_responses=True)
    return shift_divergences(p, {"q_emb": q})["q_emb"].bound(entropy_scale)


def partial_upper_bound(
    p_emb: TaskEmbeddings | tuple,
    q_emb: TaskEmbeddings | tuple,
    entropy_scale: float | None = None,
) -> BoundResult:
    """Reference-free part of the bound: √D_v + √D_t (times Ĥ when ``entropy_scale`` is given).

    Needs only the queries, so it is a label-free risk signal for a shifted task. With P's images e₁, Q's
    e₂ (D_v = ln 2) and the same questions (D_t = 0), it is √ln 2:

    >>> e1, e2 = [1.0, 0.0], [0.0, 1.0]
    >>> p = TaskEmbeddings(torch.tensor([e1, e1]), torch.tensor([e1, e2]))
    >>> q = TaskEmbeddings(torch.tensor([e2, e2]), torch.tensor([e1, e2]))
    >>> round(partial_upper_bound(p, q).value, 6), round(float(np.log(2)) ** 0.5, 6)  # √ln 2
    (0.832555, 0.832555)
    >>> round(partial_upper_bound(p, q, entropy_scale=2.0).value, 6)  # 2·√ln 2
    1.665109
    """
    p, q = _task(p_emb, "p_emb"), _task(q_emb, "q_emb")
    inputs_only = TaskEmbeddings(p.z_v, p.z_t), {"q_emb": TaskEmbeddings(q.z_v, q.z_t)}
    return shift_divergences(*inputs_only)["q_emb"].partial(entropy_scale)


# --------------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap confidence interval."""

    low: float
    high: float
    confidence_level: float
    n_resamples: int


def _percentile_bootstrap(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray],
    n_resamples: int,
    confidence_level: float,
    seed: int,
) -> Interval:
    """scipy's percentile bootstrap over row indices; ``statistic(*index_batches, axis=-1)`` is vectorised
    (each argument is a (batch, n) array of resampled row numbers)."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level}")
    res = stats.bootstrap(
        data,
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence_level,
        method="percentile",
        paired=False,
        vectorized=True,
        batch=BOOTSTRAP_BATCH,
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Interval(float(ci.low), float(ci.high), confidence_level, n_resamples)


def _resampled_emi(task: PreparedTask | PreparedCriticTask, index: np.ndarray) -> np.ndarray:
    """EMI for each row of ``index`` (B, m) of resampled row numbers (a 1-D index is one replicate).

    A replicate is EMI* = Î*(z_x; z_ŷ) − Î*(z_x; z_y) on the resample (counts: how often each row was drawn),
    both targets and all B at once: for CLUB the weighted closed form with its self-pairs at the estimate's
    share (:meth:`PreparedTask.replicates`), for a critic its bound on the resampled rows.
    """
    index = torch.as_tensor(np.atleast_2d(np.asarray(index)), dtype=torch.long)
    counts = torch.zeros(index.shape[0], task.emb.n, dtype=torch.int32)
    counts.scatter_add_(1, index, torch.ones(index.shape, dtype=torch.int32))
    mi_model, mi_ref = task.replicates(counts)
    return (mi_model - mi_ref).cpu().numpy()


def bootstrap_emi(
    club: CLUB | CriticMI,
    emb: TaskEmbeddings | tuple | PreparedTask | PreparedCriticTask,
    *,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval for a task's EMI: samples (rows) are resampled with replacement and
    EMI re-estimated with the fixed estimator. Deterministic for ``seed``.

    Replicate b is EMI_b = Î*_b(z_x; z_ŷ) − Î*_b(z_x; z_y) on resample b (:func:`_resampled_emi`; for CLUB,
    :meth:`~lmms_emi.estimators.club_form.WeightedEstimate.resampled`: copies of a row do not count as its
    negative pairs, so the replicates centre on the estimate), and the interval is the (α/2, 1 − α/2)
    percentiles of EMI_1..EMI_B for α = 1 − ``confidence_level``.
    """
    task = prepare_task(club, emb, "emb")
    return _percentile_bootstrap(
        (np.arange(task.emb.n),),
        lambda idx, axis=-1: _resampled_emi(task, idx),
        n_resamples,
        confidence_level,
        seed,
    )


def bootstrap_emid(
    club: CLUB | CriticMI,
    p_emb: TaskEmbeddings | tuple | PreparedTask | PreparedCriticTask,
    q_emb: TaskEmbeddings | tuple | PreparedTask | PreparedCriticTask,
    *,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval for EMID(P, Q), resampling the rows of P and Q independently:
    EMID_b = EMI_b(P) − EMI_b(Q), each EMI_b as in :func:`bootstrap_emi`."""
    p, q = prepare_task(club, p_emb, "p_emb"), prepare_task(club, q_emb, "q_emb")
    return _percentile_bootstrap(
        (np.arange(p.emb.n), np.arange(q.emb.n)),
        lambda ip, iq, axis=-1: _resampled_emi(p, ip) - _resampled_emi(q, iq),
        n_resamples,
        confidence_level,
        seed,
    )


# --------------------------------------------------------------------------------------------------------
# Plausibility: the range the math allows every published number
# --------------------------------------------------------------------------------------------------------
_LN2 = math.log(2.0)
_SLACK = 1e-6  # relative slack of every limit: float32 / float64 round-off, never a real excess


def mi_limit(mu_norm: float) -> float:
    """The largest |Î| (nats) a CLUB estimate can take on one task, L = (e/2)·(1 + M)², with M the largest
    |μ(x_i)| over the task's queries (see :func:`implausible`).

    >>> round(mi_limit(0.0), 6), round(mi_limit(1.0), 6)  # e/2 and 2e
    (1.359141, 5.436564)
    """
    return math.e / 2 * (1.0 + mu_norm) ** 2


def _within(value: float, low: float, high: float) -> bool:
    return low - _SLACK * abs(low) - 1e-12 <= value <= high + _SLACK * abs(high) + 1e-12


def implausible(
    values: Mapping[str, float | tuple[float, float] | None],
    *,
    mu_norm: float | None = None,
    logvar_abs: float | None = None,
    id_mu_norm: float | None = None,
    entropy_scale: float | None = None,
    jsd_max: float = math.log(2.0),
) -> str | None:
    """Why one task's numbers cannot be right (one line), or None when each lies in the range the math allows.

    ``values``: a task's numbers by :class:`~lmms_emi.pipeline.shift.TaskResult` field name (``mi_model``,
    ``mi_ref``, ``emi``, ``emi_ci``, ``emid``, ``emid_ci``, ``bound``, ``bound_theorem``, ``partial_bound``,
    ``jsd_*``; None: not computed; intervals as (low, high)). ``mu_norm``: the largest |μ(z_x)| of the
    estimator over this task's queries, ``logvar_abs`` the largest |log σ²(z_x)|; ``id_mu_norm``: the ID
    task's |μ| (for EMID); ``entropy_scale``: Ĥ of the theorem's bound.

    The derivation. Embeddings are L2-normalised, so every target has |y| = 1; log σ² comes out of a tanh,
    so log σ²_d ∈ [−1, 1] and 1/(2σ²_d) ≤ e/2 (checked: ``logvar_abs`` ≤ 1). CLUB's log-densities without
    their constant (it cancels) are

        ℓ(y | x_i) = −Σ_d (y_d − μ_id)² / (2σ²_id)  ∈  [−(e/2)·|y − μ_i|², 0]  ⊆  [−L, 0],
        L = (e/2)·(1 + M)²,   since |y − μ_i| ≤ |y| + |μ_i| ≤ 1 + M,   M = max_i |μ(x_i)|.

    The estimate is Î = Σ_i w_i (pos_i − neg_i) with pos_i = ℓ(y_i|x_i) and neg_i = Σ_j w_j ℓ(y_j|x_i), for
    weights w ≥ 0 summing to 1 (1/N for the estimate, resampling counts / N for a bootstrap replicate).
    Both pos_i and neg_i (a weighted mean of values in [−L, 0]) lie in [−L, 0], so each row's term lies in
    [−L, L], and so does Î (the leave-one-out form, N/(N−1) times it, is not used here). A bootstrap
    replicate is (1 − 1/m) times [Σ_i w_i pos_i minus a weighted mean of ℓ over pairs of distinct rows]: in
    [−L, L] too. Hence, with L_T
    :func:`mi_limit` of task T's M:

        |Î(z_x; z_ŷ)|, |Î(z_x; z_y)| ≤ L_T
        |EMI(T)| ≤ 2·L_T                       (every bootstrap replicate too, so the interval's ends)
        |EMID(P, Q)| ≤ 2·L_P + 2·L_Q           (likewise its interval)

    M itself is the estimator's own output; a fitted μ targets unit vectors and stays near 1, so M above
    :data:`~lmms_emi.estimators.checkpoint.MU_NORM_LIMIT` (1e3, i.e. L ≤ 1.4e6 nats) is refused as a corrupt
    estimator, whatever the numbers. The paper's estimator has M ≈ 3 on unit vectors: L ≈ 21 nats.

    The divergences are RJSD, a lower bound on the Jensen-Shannon divergence, D ∈ [0, ln 2]; so √D ≤ √ln 2
    and D^¼ ≤ (ln 2)^¼, and

        partial bound   √D_v + √D_t                     ≤ 2√ln 2                      ≈ 1.665
        bound           √D_v + √D_t + D_P^¼ + D_Q^¼     ≤ 2√ln 2 + 2(ln 2)^¼          ≈ 3.490
        theorem form    Ĥ(√D_v + √D_t) + 8(D_P + D_Q)^¼ ≤ 2Ĥ√ln 2 + 8(2 ln 2)^¼       ≈ 1.665·Ĥ + 8.681

    and each number must be finite. Every limit gets a relative slack of 1e-6 for round-off. Another JSD
    estimator's range [0, ``jsd_max``] replaces [0, ln 2] (MMD² with a kernel bounded by 1: [0, 2]). Without
    ``mu_norm`` (a critic estimator, which has no μ) only finiteness is checked of the MI numbers.

    >>> implausible({"emi": 0.02, "mi_model": 0.5, "mi_ref": 0.48}, mu_norm=2.9, logvar_abs=1.0) is None
    True
    >>> print(implausible({"emi": -6.6e34}, mu_norm=2.9))
    EMI = -6.6e+34 nats, outside ±2·(e/2)·(1 + |μ|)² = ±41.3 for the estimator's |μ| ≤ 2.9 on these queries
    >>> print(implausible({"emi": 0.1}, mu_norm=1e17))
    the estimator's mean reaches |μ(x)| = 1e+17 on these queries (a fitted one stays near 1; limit 1e+03)
    >>> print(implausible({"bound": 3.6, "jsd_visual": 0.7}))
    bound = 3.6, outside [0, 3.49] (2√ln 2 + 2(ln 2)^¼)
    >>> print(implausible({"emid_ci": (0.1, float("nan"))}, mu_norm=1.0, id_mu_norm=1.0))
    the EMID interval is NaN
    """
    for name, mu in (("", mu_norm), ("the ID task's ", id_mu_norm)):
        if mu is not None and not (math.isfinite(mu) and mu <= MU_NORM_LIMIT):
            return (
                f"the estimator's mean reaches |μ(x)| = {mu:.3g} on {name or 'these '}queries (a fitted one "
                f"stays near 1; limit {MU_NORM_LIMIT:.0e})"
            )
    if logvar_abs is not None and not _within(logvar_abs, 0.0, 1.0):
        return f"the estimator's log σ²(x) reaches {logvar_abs:.3g}, outside the [−1, 1] of its tanh"
    labels = {"emi": "EMI", "emid": "EMID", "mi_model": "Î(z_x; z_ŷ)", "mi_ref": "Î(z_x; z_y)"}
    limits = _limits(mu_norm, id_mu_norm, entropy_scale, jsd_max)
    for key, value in values.items():
        if value is None:
            continue
        ends = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        base = key.removesuffix("_ci")
        field = labels.get(base, base.replace("_", " ")) + (" interval" if key.endswith("_ci") else "")
        for end in ends:
            if not math.isfinite(end):
                return f"the {field} is {end}".replace("nan", "NaN")
            if base in limits:
                (low, high), why = limits[base]
                if not _within(end, low, high):
                    return f"{field} = {end:.3g}{' nats' if key.startswith(('mi', 'emi')) else ''}, {why}"
    return None


def _limits(
    mu_norm: float | None,
    id_mu_norm: float | None,
    entropy_scale: float | None,
    jsd_max: float = _LN2,
) -> dict[str, tuple[tuple[float, float], str]]:
    """(low, high) and how it is derived, per field (see :func:`implausible`)."""
    out: dict[str, tuple[tuple[float, float], str]] = {}
    top = "ln 2" if jsd_max == _LN2 else f"{jsd_max:g}"
    what = "a Jensen-Shannon divergence" if jsd_max == _LN2 else "the divergence estimator"
    for key in ("jsd_visual", "jsd_text", "jsd_response_p", "jsd_response_q"):
        out[key] = ((0.0, jsd_max), f"outside the [0, {top}] of {what}")
    partial = 2 * jsd_max**0.5  # TaskResult.partial_bound is the form without Ĥ
    out["partial_bound"] = ((0.0, partial), f"outside [0, {partial:.4g}] (2√{top})")
    full = 2 * jsd_max**0.5 + 2 * jsd_max**0.25
    out["bound"] = ((0.0, full), f"outside [0, {full:.4g}] (2√{top} + 2({top})^¼)")
    if entropy_scale is not None:
        theorem = 2 * entropy_scale * jsd_max**0.5 + 8 * (2 * jsd_max) ** 0.25
        out["bound_theorem"] = ((0.0, theorem), f"outside [0, {theorem:.4g}] (2Ĥ√{top} + 8(2 {top})^¼)")
    if mu_norm is not None:
        one = mi_limit(mu_norm)
        tail = f"for the estimator's |μ| ≤ {mu_norm:.3g} on these queries"
        for key in ("mi_model", "mi_ref"):
            out[key] = ((-one, one), f"outside ±(e/2)·(1 + |μ|)² = ±{one:.3g} {tail}")
        out["emi"] = ((-2 * one, 2 * one), f"outside ±2·(e/2)·(1 + |μ|)² = ±{2 * one:.3g} {tail}")
        if id_mu_norm is not None:
            both = 2 * one + 2 * mi_limit(id_mu_norm)
            out["emid"] = ((-both, both), f"outside ±{both:.3g} (2·(e/2)·(1 + |μ|)² of each task)")
    return out
