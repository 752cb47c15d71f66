"""CLUB's closed form: pure functions of q(y|x)'s parameters and the targets (tensors in, numbers out).

CLUB (the contrastive log-ratio upper bound, Cheng et al., ICML 2020) takes a Gaussian q(y|x_i) =
N(μ_i, diag σ²_i) fitted to paired samples (:class:`~lmms_emi.estimators.club.CLUB`) and estimates

    Î(X; Y) = 1/N Σ_i log q(y_i|x_i) − 1/N² Σ_i Σ_j log q(y_j|x_i)

with the constant −½ ln 2πσ² dropped (it cancels between the two terms), i.e. Î = 1/N Σ_i s_i with per row i

    s_i  = pos_i − neg_i
    pos_i = −Σ_d (y_id − μ_id)² / (2σ²_id)
    neg_i = −Σ_d (1/N Σ_j (y_jd − μ_id)²) / (2σ²_id)
          = −Σ_d (m2_d − 2 μ_id m1_d + μ²_id) / (2σ²_id),    m1 = mean_j y_j,  m2 = mean_j y_j²,

so the negative term costs O(N·d) time and memory instead of the O(N²·d) of the pairwise form.
The negative mean includes j = i, as in the paper's code; the leave-one-out variant (j ≠ i) equals the
above times N/(N−1) exactly.

With row weights w (Σ_i w_i = 1) in place of 1/N, and a = 1/(2σ²), b = μ·a, c_i = Σ_d μ²_id a_id, the same
algebra gives the estimate on a reweighted sample (a bootstrap replicate: w = resampling counts / N) as

    Î(w) = wᵀpos + Σ_d (wᵀa)_d (wᵀy²)_d − 2 Σ_d (wᵀb)_d (wᵀy)_d + wᵀc.

The two middle terms are one quadratic form, Σ_d (wᵀa)_d (wᵀy²)_d − 2 Σ_d (wᵀb)_d (wᵀy)_d = wᵀKw with the
N×N matrix K = a(y²)ᵀ − 2byᵀ, so many weightings of a small sample of wide embeddings (a bootstrap of 90
samples in 768 dims) cost O(N²·d + B·N²) instead of O(B·N·d); the cheaper of the two forms is chosen from
the shapes.

Bootstrap replicates. A resample drawn with replacement holds copies of rows, and the weighted form counts
the pairs of a row with its own copies (weight Σ_i w_i², about 2/N on average) in the negative mean, where
the estimate has only its N self-pairs (weight 1/N). Each replicate is therefore pulled toward 0 by about
Î/N, and a percentile interval of them sits off-centre: on the demo's 12-sample tasks the estimate lay at
the 34th percentile of its own replicates on average and at the 9th at worst. A replicate of
:meth:`WeightedEstimate.resampled` keeps the estimate's share of self-pairs instead: for resampling counts c
of total m, w = c/m and S = Σ_i w_i² (the weight of the pairs of copies, self-pairs included),

    Î*(c) = (1 − 1/m) · [wᵀpos − (wᵀpos − Î(w) − (w²)ᵀpos) / (1 − S)],

the bracket being the leave-one-out estimate on the resample: its negative mean runs over pairs of distinct
original rows only (wᵀpos − Î(w) is the weighted negative sum over all pairs, (w²)ᵀpos the part of it on
copies). Î = (1 − 1/N) times the leave-one-out estimate for every sample (see above), so with every row once
(c = 1) Î*(c) = Î exactly, and the replicates' median sits at the estimate (the demo: 48th percentile on
average). A resample of one distinct row has no pair of distinct rows; its Î*(c) is Î(w) = 0.

The functions (all float64 on ``mu``'s device):

- :func:`club_mutual_information` — the point estimate Î (the uniform-weights case of the weighted form);
- :func:`weighted_club_mutual_information` — Î(w) for B weight vectors at once, and :class:`WeightedEstimate`,
  the same with the weight-free terms kept for further weightings, and its bootstrap replicates
  (:meth:`WeightedEstimate.resampled`);
- :func:`club_sample_contributions` — the per-sample terms s_i whose mean is Î.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

__all__ = [
    "CHUNK_ROWS",
    "WeightedEstimate",
    "club_mutual_information",
    "club_sample_contributions",
    "weighted_club_mutual_information",
]

#: Rows per chunk of the O(N·d) moments form (and of the estimator's forward pass): bounds the float64
#: working memory. Read at call time, so the value never changes a result beyond float64 round-off.
CHUNK_ROWS = 4096

FORMS = ("auto", "moments", "gram")


def club_mutual_information(
    mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, *, leave_one_out: bool = False
) -> float:
    """Closed-form CLUB estimate from the conditional means/log-variances of q(y|x_i) and the samples y_i.

        Î = 1/N Σ_i [pos_i − neg_i]   (see the module docstring; ×N/(N−1) with ``leave_one_out``)

    the uniform-weights case of :func:`weighted_club_mutual_information`: O(N·d) time, O(chunk·d) extra
    memory. ``leave_one_out`` excludes j = i from the negative mean.

    >>> y = torch.tensor([[1.0], [-1.0]])  # μ = y, σ² = 1: pos_i = 0, neg_i = ½(0 − 2²/2) = −1
    >>> club_mutual_information(y, torch.zeros(2, 1), y)
    1.0
    >>> club_mutual_information(y, torch.zeros(2, 1), y, leave_one_out=True)
    2.0
    """
    _check_conditionals(mu, logvar, y)
    n = y.shape[0]
    if n < 2:
        raise ValueError(f"CLUB needs at least 2 samples, got {n}")
    uniform = torch.ones((), dtype=torch.float64, device=mu.device).expand(1, n)
    estimate = float(weighted_club_mutual_information(mu, logvar, y, uniform)[0])
    return estimate * n / (n - 1) if leave_one_out else estimate


def club_sample_contributions(
    mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """The per-sample terms of the CLUB estimate, s_i = log q(y_i|x_i) − 1/N Σ_j log q(y_j|x_i) (without the
    constant), whose mean is Î exactly: shape (n,), float64, on ``mu``'s device.

        s_i = pos_i − neg_i = −Σ_d [(y_id − μ_id)² − (m2_d − 2 μ_id m1_d + μ²_id)] / (2σ²_id)

    with m1, m2 the means of y and y² over the sample (the negative term needs the whole sample, so s_i is a
    contribution *to this sample's* Î, not a function of row i alone). ``y`` may be a sequence of T targets
    sharing μ, log σ² (a task's responses and references): the result then has shape (T, n).

    Example: d = 1, σ² = 1, y = (1, −1), μ = (1, 0): a = ½, m1 = 0, m2 = 1, so
    s_1 = −½[(1 − 1)² − (1 − 0 + 1)] = 1 and s_2 = −½[(−1 − 0)² − (1 − 0 + 0)] = 0; their mean ½ is Î:

    >>> y, mu = torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [0.0]])
    >>> club_sample_contributions(mu, torch.zeros(2, 1), y)
    tensor([1., 0.], dtype=torch.float64)
    >>> club_mutual_information(mu, torch.zeros(2, 1), y)
    0.5
    """
    targets = [y] if isinstance(y, torch.Tensor) else list(y)
    for target in targets:
        _check_conditionals(mu, logvar, target)
    mu64 = mu.to(torch.float64)
    a = logvar.to(torch.float64, copy=True).neg_().exp_().mul_(0.5)  # 1 / (2σ²)
    rows = []
    for target in targets:
        y64 = target.to(mu.device, torch.float64)
        pos = _own_log_density(y64, mu64, a)
        m1, m2 = y64.mean(dim=0), (y64**2).mean(dim=0)  # 1/N Σ_j (y_j − μ_i)² = m2 − 2μ_i m1 + μ_i²
        neg = -((m2 - 2 * mu64 * m1 + mu64**2) * a).sum(dim=1)
        rows.append(pos - neg)
    return rows[0] if isinstance(y, torch.Tensor) else torch.stack(rows)


def weighted_club_mutual_information(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    y: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    form: str = "auto",
) -> torch.Tensor:
    """Closed-form CLUB estimate for each row of ``weights`` (B, n): shape (B,), float64, on ``mu``'s device.

    With w a row of ``weights`` normalised to sum 1 (so resampling counts can be passed as they are),
    a = 1/(2σ²), b = μ·a, c_i = Σ_d μ²_id a_id and pos_i = −Σ_d (y_id − μ_id)² a_id:

        Î(w) = Σ_i w_i log q(y_i|x_i) − Σ_i Σ_j w_i w_j log q(y_j|x_i)
             = wᵀpos + Σ_d (wᵀa)_d (wᵀy²)_d − 2 Σ_d (wᵀb)_d (wᵀy)_d + wᵀc.

    ``form="moments"`` computes this in float64 over row chunks, accumulating the (B, d) products chunk by
    chunk: O(B·n·d) time, O(B·d + B·chunk + chunk·d) extra memory, never a float64 copy of all of μ, log σ²,
    y or y². ``form="gram"`` uses the two middle terms as wᵀKw, K = a(y²)ᵀ − 2byᵀ (n, n): O(n²·d + B·n²)
    time and O(n·d + n²) memory, far cheaper for many weightings of few rows. ``"auto"`` takes the one with
    fewer operations (the gram form only for n ≤ d); both agree to float64 round-off.
    ``y`` may also be a sequence of T targets sharing the same μ, log σ² (a task's model responses and
    references): the terms of μ and σ² are then computed once and the result has shape (T, B).
    :class:`WeightedEstimate` keeps the terms that do not depend on w for further weightings.

    Example: d = 1, σ² = 1, μ_i = y_i = ±1, so pos = 0, log q(y_j|x_i) = −2²/2 = −2 for j ≠ i and
    Î(w) = 0 + 2·w₁w₂·2 = 4·w₁w₂: 1 for uniform weights, 0 for one row alone, 0.75 for w = (¾, ¼):

    >>> y = torch.tensor([[1.0], [-1.0]])
    >>> weighted_club_mutual_information(y, torch.zeros(2, 1), y, torch.tensor([[1, 1], [1, 0], [3, 1]]))
    tensor([1.0000, 0.0000, 0.7500], dtype=torch.float64)
    """
    weights = torch.as_tensor(weights)
    n_sets = weights.shape[0] if weights.ndim == 2 else 1  # (a bad shape is refused by the call)
    out = WeightedEstimate(mu, logvar, y, form=form, n_sets=n_sets)(weights)
    return out[0] if isinstance(y, torch.Tensor) else out


class WeightedEstimate:
    """The weighted CLUB estimate Î(w) of :func:`weighted_club_mutual_information` for fixed μ, log σ² and
    targets, callable on any (B, n) weights and returning (T, B). The terms that do not depend on w are
    computed once, at construction, when the gram form is taken: a bootstrap evaluates a thousand weightings
    of one task, batch by batch. ``n_sets``: how many weightings one call will get (with ``form="auto"``, it
    decides which form is cheaper). ``form`` holds the form taken, ``"gram"`` or ``"moments"``.

    Same example as :func:`weighted_club_mutual_information`, with y and −y as two targets: Î(w) = 4·w₁w₂
    for y; for −y, log q(−y_i|x_i) = −2²/2 = −2 and log q(−y_j|x_i) = 0 for j ≠ i, so Î(w) = −2 + 2(w₁² + w₂²)
    = −4·w₁w₂:

    >>> y = torch.tensor([[1.0], [-1.0]])
    >>> estimate = WeightedEstimate(y, torch.zeros(2, 1), (y, -y))
    >>> estimate(torch.tensor([[1, 1], [3, 1]]))
    tensor([[ 1.0000,  0.7500],
            [-1.0000, -0.7500]], dtype=torch.float64)
    >>> estimate.form  # n > d: the n×n gram form is never cheaper
    'moments'
    """

    def __init__(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        y: torch.Tensor | Sequence[torch.Tensor],
        *,
        form: str = "auto",
        n_sets: int = 1,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be 'auto', 'moments' or 'gram', got {form!r}")
        self.targets = [y] if isinstance(y, torch.Tensor) else list(y)
        for target in self.targets:
            _check_conditionals(mu, logvar, target)
        self.mu, self.logvar = mu, logvar
        n, d = mu.shape
        gram = form == "gram" or (form == "auto" and _gram_is_cheaper(n, d, n_sets, len(self.targets)))
        self.form = "gram" if gram else "moments"
        self._terms = _gram_terms(mu, logvar, self.targets) if gram else None  # None: the moments form

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        return self._weighted(*_checked_weights(weights, self.mu.shape[0], self.mu.device))

    def _weighted(self, weights: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
        """Î(w) for checked weights and their row sums."""
        if self._terms is not None:
            w = weights.to(self.mu.device, torch.float64) / totals[:, None]
            return torch.stack([w @ linear + ((w @ k) * w).sum(dim=1) for linear, k in self._terms])
        return _weighted_mi_moments(self.mu, self.logvar, self.targets, weights, totals)

    def resampled(self, counts: torch.Tensor) -> torch.Tensor:
        """The bootstrap replicate Î*(c) for each row of resampling ``counts`` (B, n): (T, B) float64, the
        self-pairs of the negative mean kept at the estimate's share (module docstring). With every row
        drawn once it is the estimate; ValueError for counts that are not whole numbers.

        Same example as the class's: y = ±1 targets have Î(w) = 4·w₁w₂ and −4·w₁w₂. The resample (1, 1) is
        the sample itself; (2, 0) holds one distinct row, so no pair of distinct rows: 0.

        >>> y = torch.tensor([[1.0], [-1.0]])
        >>> WeightedEstimate(y, torch.zeros(2, 1), (y, -y)).resampled(torch.tensor([[1, 1], [2, 0]]))
        tensor([[ 1.,  0.],
                [-1.,  0.]], dtype=torch.float64)
        """
        counts, m = _checked_weights(counts, self.mu.shape[0], self.mu.device)
        if not bool((counts == torch.round(counts)).all()):
            raise ValueError("resampling counts must be whole numbers")
        plain = self._weighted(counts, m)  # Î(w): (T, B)
        w = counts.to(self.mu.device, torch.float64) / m[:, None]
        w2 = w.square()
        copies = w2.sum(dim=1)  # S: the weight of pairs of copies of one row
        linear, own = self._positive @ w.T, self._positive @ w2.T  # wᵀpos, (w²)ᵀpos: (T, B)
        distinct = copies < 1.0 - 1e-12
        loo = linear - (linear - plain - own) / torch.where(distinct, 1.0 - copies, 1.0)
        return torch.where(distinct, (1.0 - 1.0 / m) * loo, plain)

    @cached_property
    def _positive(self) -> torch.Tensor:
        """pos_i = log q(y_i|x_i) without its constant, per target: (T, n) float64, over row chunks."""
        rows = []
        for target in self.targets:
            parts = []
            for start in range(0, self.mu.shape[0], CHUNK_ROWS):
                sl = slice(start, start + CHUNK_ROWS)
                mu_c, a, _, _ = _variance_terms(self.mu[sl], self.logvar[sl])
                y_c = target[sl].to(self.mu.device, torch.float64)
                parts.append(_own_log_density(y_c, mu_c, a))
            rows.append(torch.cat(parts))
        return torch.stack(rows)


def _check_conditionals(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> None:
    if y.ndim != 2 or mu.shape != y.shape or logvar.shape != y.shape:
        raise ValueError(
            f"mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)}, y {tuple(y.shape)} must be equal (n, d)"
        )


def _checked_weights(
    weights: torch.Tensor, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weights`` as a tensor and its row sums (float64, on ``device``); ValueError for a bad matrix."""
    weights = torch.as_tensor(weights)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be a (B, {n}) matrix, got shape {tuple(weights.shape)}")
    totals = weights.sum(dim=1, dtype=torch.float64).to(device)
    if not (bool((weights >= 0).all()) and bool(torch.isfinite(totals).all()) and bool((totals > 0).all())):
        raise ValueError("weights must be finite and non-negative, with a positive sum in every row")
    return weights, totals


def _gram_is_cheaper(n: int, d: int, n_sets: int, n_targets: int) -> bool:
    """Whether the quadratic form beats the moments for these shapes (multiply-adds of each; n ≤ d keeps the
    n×n matrices no larger than the d-wide inputs)."""
    moments = n_sets * n * d * (2 + 2 * n_targets)
    gram = n_targets * (2 * n * n * d + n_sets * n * n)
    return n <= d and gram < moments


def _own_log_density(y: torch.Tensor, mu: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """pos_i = log q(y_i|x_i) without its constant, −Σ_d (y_id − μ_id)² a_id with a = 1/(2σ²): (n,)."""
    return (y - mu).square_().mul_(a).sum(dim=1).neg_()


def _variance_terms(
    mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """μ, a = 1/(2σ²), b = μ·a and c = Σ_d μ²a in float64: the terms of q(y|x) both forms share."""
    mu64 = mu.to(torch.float64)
    a = logvar.to(torch.float64, copy=True).neg_().exp_().mul_(0.5)
    b = mu64 * a
    return mu64, a, b, (b * mu64).sum(dim=1)


def _gram_terms(
    mu: torch.Tensor, logvar: torch.Tensor, targets: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per target, pos + c (n,) and K = a(y²)ᵀ − 2byᵀ (n, n) in float64, so Î(w) = wᵀ(pos + c) + wᵀKw."""
    mu64, a, b, c = _variance_terms(mu, logvar)
    terms = []
    for target in targets:
        y64 = target.to(mu.device, torch.float64)
        pos = _own_log_density(y64, mu64, a)
        k = a @ y64.square().T
        k.addmm_(b, y64.T, alpha=-2.0)
        terms.append((pos + c, k))
    return terms


def _weighted_mi_moments(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    targets: Sequence[torch.Tensor],
    weights: torch.Tensor,
    totals: torch.Tensor,
) -> torch.Tensor:
    """The moments form over row chunks (see :func:`weighted_club_mutual_information`): (T, B) float64."""
    f64, device = torch.float64, mu.device
    n, d = mu.shape
    n_sets = weights.shape[0]
    chunk = CHUNK_ROWS

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=f64, device=device)

    wa, wb = zeros(n_sets, d), zeros(n_sets, d)  # shared by every target
    linear = [zeros(n_sets) for _ in targets]  # wᵀ(pos + c) per target
    wy = [zeros(n_sets, d) for _ in targets]
    wy2 = [zeros(n_sets, d) for _ in targets]
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        w = weights[:, rows].to(device, f64) / totals[:, None]
        mu_c, a, b, c = _variance_terms(mu[rows], logvar[rows])
        wa.addmm_(w, a)
        wb.addmm_(w, b)
        for t, target in enumerate(targets):
            y_c = target[rows].to(device, f64, copy=True)  # a copy: squared in place below
            pos = _own_log_density(y_c, mu_c, a)
            linear[t].addmv_(w, pos + c)
            wy[t].addmm_(w, y_c)
            wy2[t].addmm_(w, y_c.square_())
            del y_c, pos
        del w, mu_c, a, b, c  # free this chunk before the next one is allocated
    return torch.stack(
        [
            lin + (wa * q2).sum(dim=1) - 2.0 * (wb * q1).sum(dim=1)
            for lin, q1, q2 in zip(linear, wy, wy2, strict=True)
        ]
    )
