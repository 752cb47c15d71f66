"""CLUB: the contrastive log-ratio upper bound of mutual information (Cheng et al., ICML 2020).

A variational Gaussian q(y|x) = N(μ(x), diag σ²(x)) is fitted by maximum likelihood; then

    Î(X; Y) = 1/N Σ_i log q(y_i|x_i) − 1/N² Σ_i Σ_j log q(y_j|x_i)

with the constant −½ ln 2πσ² dropped (it cancels between the two terms), i.e. per row i

    pos_i = −Σ_d (y_id − μ_id)² / (2σ²_id)
    neg_i = −Σ_d (1/N Σ_j (y_jd − μ_id)²) / (2σ²_id)
          = −Σ_d (m2_d − 2 μ_id m1_d + μ²_id) / (2σ²_id),    m1 = mean_j y_j,  m2 = mean_j y_j²,

so the negative term costs O(N·d) time and memory instead of the O(N²·d) of the pairwise form.
The negative mean includes j = i, as in the paper's code; the leave-one-out variant (j ≠ i) equals the
above times N/(N−1) exactly.

With row weights w (Σ_i w_i = 1) in place of 1/N, and a = 1/(2σ²), b = μ·a, c_i = Σ_d μ²_id a_id, the same
algebra gives the estimate on a reweighted sample (a bootstrap replicate: w = resampling counts / N) as

    Î(w) = wᵀpos + Σ_d (wᵀa)_d (wᵀy²)_d − 2 Σ_d (wᵀb)_d (wᵀy)_d + wᵀc,

which :func:`weighted_club_mutual_information` evaluates for B weight vectors at once; the plain estimate
(:func:`club_mutual_information`) is its uniform-weights case. The two middle terms are one quadratic form,
Σ_d (wᵀa)_d (wᵀy²)_d − 2 Σ_d (wᵀb)_d (wᵀy)_d = wᵀKw with the N×N matrix K = a(y²)ᵀ − 2byᵀ, so many weightings
of a small sample of wide embeddings (a bootstrap of 90 samples in 768 dims) cost O(N²·d + B·N²) instead
of O(B·N·d); the cheaper of the two forms is chosen from the shapes.

:class:`CLUB` follows scikit-learn's conventions: ``fit`` returns the estimator, learned state ends in ``_``
(``fit_info_``, ``manifest_``), and estimating before ``fit`` / loading a checkpoint raises
:class:`~lmms_emi.errors.NotFittedError`.

The module layout (``p_mu``, ``p_logvar``) matches the paper's estimator, so its state dict loads directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmms_emi._io import atomic_write
from lmms_emi.errors import CheckpointError, EncoderMismatchError, NotFittedError

__all__ = [
    "CLUB",
    "PAPER_ENCODERS",
    "CheckpointError",
    "CheckpointManifest",
    "EncoderMismatchError",
    "FitInfo",
    "NotFittedError",
    "WeightedEstimate",
    "club_mutual_information",
    "encoder_mismatches",
    "fingerprint",
    "tensors_checksum",
    "weighted_club_mutual_information",
]

#: The encoders the paper's estimator (``CLUB_global.pt``) was trained on: CLIP ViT-B/32 patch-token mean of
#: the last hidden state, and XLM-R-base mean over tokens after the first of hidden state 0.
PAPER_ENCODERS: dict[str, dict[str, Any]] = {
    "vision": {"name": "openai/clip-vit-base-patch32", "feature": "patch_mean", "layer": -1, "dim": 768},
    "text": {"name": "xlm-roberta-base", "feature": "mean_after_first", "layer": 0, "dim": 768},
}

MANIFEST_KEY = "lmms_emi_manifest"
FORMAT_NAME = "lmms-emi-club"
FORMAT_VERSION = 1
_CHUNK_ROWS = 4096  # rows per chunk of the O(N·d) estimate: bounds the float64 working memory


@dataclass(frozen=True)
class CheckpointManifest:
    """What a saved estimator was trained on, stored inside the checkpoint file.

    ``tensors_sha256`` (:func:`tensors_checksum` of the state dict, set by :meth:`CLUB.save`) is verified on
    load; it is '' in checkpoints written before it existed, which load unverified."""

    x_dim: int
    y_dim: int
    hidden_size: int
    encoders: dict[str, Any]
    data_fingerprint: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    tensors_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointManifest:
        """Parse and type-check a manifest; ValueError naming the first bad field."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a manifest must be a JSON object, got {type(data).__name__}")
        kinds = {"x_dim": int, "y_dim": int, "hidden_size": int, "version": int, "encoders": dict}
        kinds.update(hyperparameters=dict, data_fingerprint=str, format=str, tensors_sha256=str)
        names = {int: "an integer", dict: "an object", str: "a string"}
        required = ("x_dim", "y_dim", "hidden_size", "encoders")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}")
        for key, kind in kinds.items():
            if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
                raise ValueError(f"manifest field {key} must be {names[kind]}, got {data[key]!r}")
        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise ValueError(f"manifest of format {data['format']!r}, expected {FORMAT_NAME!r}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def tensors_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (in name order): the manifest's checksum."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class FitInfo:
    """How a fit went: steps run, last smoothed loss, whether the plateau stop fired, data fingerprint."""

    steps_run: int
    final_loss: float
    stopped_early: bool
    data_fingerprint: str
    hyperparameters: dict[str, Any]


def encoder_mismatches(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Differences between two encoder specs, as readable lines ('' list when they agree)."""
    problems = []
    for role in sorted(set(expected) | set(actual)):
        want, got = expected.get(role), actual.get(role)
        if not isinstance(want, Mapping) or not isinstance(got, Mapping):
            if want != got:
                problems.append(f"{role}: checkpoint has {want!r}, embeddings come from {got!r}")
            continue
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                problems.append(f"{role}.{key}: checkpoint has {want.get(key)!r}, in use {got.get(key)!r}")
    return problems


def fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' float32 bytes and shapes: identifies the data an estimator was fitted on."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


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
    decides which form is cheaper)."""

    def __init__(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        y: torch.Tensor | Sequence[torch.Tensor],
        *,
        form: str = "auto",
        n_sets: int = 1,
    ) -> None:
        if form not in ("auto", "moments", "gram"):
            raise ValueError(f"form must be 'auto', 'moments' or 'gram', got {form!r}")
        self.targets = [y] if isinstance(y, torch.Tensor) else list(y)
        for target in self.targets:
            _check_conditionals(mu, logvar, target)
        self.mu, self.logvar = mu, logvar
        n, d = mu.shape
        gram = form == "gram" or (form == "auto" and _gram_is_cheaper(n, d, n_sets, len(self.targets)))
        self._terms = _gram_terms(mu, logvar, self.targets) if gram else None  # None: the moments form

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        weights, totals = _checked_weights(weights, self.mu.shape[0], self.mu.device)
        if self._terms is not None:
            w = weights.to(self.mu.device, torch.float64) / totals[:, None]
            return torch.stack([w @ linear + ((w @ k) * w).sum(dim=1) for linear, k in self._terms])
        return _weighted_mi_moments(self.mu, self.logvar, self.targets, weights, totals)


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


def _gram_terms(
    mu: torch.Tensor, logvar: torch.Tensor, targets: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per target, pos + c (n,) and K = a(y²)ᵀ − 2byᵀ (n, n) in float64, so Î(w) = wᵀ(pos + c) + wᵀKw."""
    mu64, a, b, c = _variance_terms(mu, logvar)
    terms = []
    for target in targets:
        y64 = target.to(mu.device, torch.float64)
        pos = (y64 - mu64).square_().mul_(a).sum(dim=1).neg_()
        k = a @ y64.square().T
        k.addmm_(b, y64.T, alpha=-2.0)
        terms.append((pos + c, k))
    return terms


def _variance_terms(
    mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """μ, a = 1/(2σ²), b = μ·a and c = Σ_d μ²a in float64: the terms of q(y|x) both forms share."""
    mu64 = mu.to(torch.float64)
    a = logvar.to(torch.float64, copy=True).neg_().exp_().mul_(0.5)
    b = mu64 * a
    return mu64, a, b, (b * mu64).sum(dim=1)


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

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=f64, device=device)

    wa, wb = zeros(n_sets, d), zeros(n_sets, d)  # shared by every target
    linear = [zeros(n_sets) for _ in targets]  # wᵀ(pos + c) per target
    wy = [zeros(n_sets, d) for _ in targets]
    wy2 = [zeros(n_sets, d) for _ in targets]
    for start in range(0, n, _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        w = weights[:, rows].to(device, f64) / totals[:, None]
        mu_c, a, b, c = _variance_terms(mu[rows], logvar[rows])
        wa.addmm_(w, a)
        wb.addmm_(w, b)
        for t, target in enumerate(targets):
            y_c = target[rows].to(device, f64, copy=True)  # a copy: squared in place below
            pos = (y_c - mu_c).square_().mul_(a).sum(dim=1).neg_()
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


def _check_conditionals(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> None:
    if y.ndim != 2 or mu.shape != y.shape or logvar.shape != y.shape:
        raise ValueError(
            f"mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)}, y {tuple(y.shape)} must be equal (n, d)"
        )


def _mlp(x_dim: int, hidden: int, y_dim: int, *, bounded: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, y_dim)]
    if bounded:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class CLUB(nn.Module):
    """Gaussian variational q(y|x) with mean ``p_mu(x)`` and log-variance ``p_logvar(x)`` ∈ (−1, 1).

    ``p_mu = Linear(x_dim, h/2) → Tanh → Linear(h/2, y_dim)``; ``p_logvar`` is the same plus a final Tanh.

    Fitted (scikit-learn's sense) after :meth:`fit`, :meth:`from_checkpoint` or :meth:`load_state_dict`;
    before that, :meth:`conditional_params` and :meth:`mutual_information` raise ``NotFittedError``.
    Learned state: ``fit_info_`` (set by ``fit``) and ``manifest_`` (set by ``save`` / ``from_checkpoint``,
    reset by ``fit``); both are None when unknown.
    """

    def __init__(self, x_dim: int = 768, y_dim: int = 768, hidden_size: int = 500) -> None:
        super().__init__()
        if min(x_dim, y_dim) < 1 or hidden_size < 2:
            raise ValueError(f"bad CLUB sizes x_dim={x_dim}, y_dim={y_dim}, hidden_size={hidden_size}")
        self.x_dim, self.y_dim, self.hidden_size = x_dim, y_dim, hidden_size
        self.p_mu = _mlp(x_dim, hidden_size // 2, y_dim, bounded=False)
        self.p_logvar = _mlp(x_dim, hidden_size // 2, y_dim, bounded=True)
        self.manifest_: CheckpointManifest | None = None
        self.fit_info_: FitInfo | None = None
        self._fitted = False

    # -- fitted state (scikit-learn's protocol) -----------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        """True once fitted, loaded from a checkpoint, or given a state dict."""
        return self._fitted

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(
                f"this CLUB({self.x_dim}, {self.y_dim}, {self.hidden_size}) is not fitted: call fit() or "
                "load a checkpoint (CLUB.from_checkpoint / load_state_dict) before estimating"
            )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, marking the estimator fitted when no weight is missing."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if not result.missing_keys:
            self._fitted = True
        return result

    # -- the model ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional mean and log-variance of q(y|x)."""
        return self.p_mu(x), self.p_logvar(x)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training objective: mean_i Σ_d [−(y_id − μ_id)²/σ²_id − log σ²_id] (2× the Gaussian log-density
        without its constant)."""
        mu, logvar = self(x)
        return (-((mu - y) ** 2) * torch.exp(-logvar) - logvar).sum(dim=1).mean()

    def _check_pairs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.ndim != 2 or y.ndim != 2:
            raise ValueError(f"x and y must be 2-D, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}: samples must be paired")
        if x.shape[1] != self.x_dim or y.shape[1] != self.y_dim:
            raise ValueError(
                f"this CLUB takes x of dim {self.x_dim} and y of dim {self.y_dim}, "
                f"got {x.shape[1]} and {y.shape[1]}"
            )
        if x.shape[0] < 2:
            raise ValueError(f"CLUB needs at least 2 paired samples, got {x.shape[0]}")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("x or y contains NaN or inf")
        device = next(self.parameters()).device
        return x.to(device, torch.float32), y.to(device, torch.float32)

    @torch.no_grad()
    def conditional_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ(x), log σ²(x) for all rows, computed in chunks under no_grad."""
        self._check_fitted()
        device = next(self.parameters()).device
        x = torch.as_tensor(x).to(device, torch.float32)
        mu = torch.empty(x.shape[0], self.y_dim, device=device)  # filled chunk by chunk: no concatenation
        logvar = torch.empty_like(mu)
        for i in range(0, x.shape[0], _CHUNK_ROWS):
            mu[i : i + _CHUNK_ROWS], logvar[i : i + _CHUNK_ROWS] = self(x[i : i + _CHUNK_ROWS])
        return mu, logvar

    def mutual_information(self, x: torch.Tensor, y: torch.Tensor, *, leave_one_out: bool = False) -> float:
        """CLUB estimate of I(X; Y) in nats from paired rows (x_i, y_i); O(N·d) (see module docstring):
        Î = 1/N Σ_i log q(y_i|x_i) − 1/N² Σ_i Σ_j log q(y_j|x_i)."""
        self._check_fitted()
        x, y = self._check_pairs(x, y)
        was_training = self.training
        self.eval()
        try:
            mu, logvar = self.conditional_params(x)
        finally:
            self.train(was_training)
        return club_mutual_information(mu, logvar, y, leave_one_out=leave_one_out)

    # -- training ----------------------------------------------------------------------------------
    def reset_parameters(self, seed: int) -> None:
        """Re-draw every Linear layer as PyTorch's default init does, from a CPU generator seeded by ``seed``
        (identical on any device). The estimator is unfitted afterwards."""
        self._fitted = False
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                with torch.no_grad():
                    for p in (module.weight, module.bias):
                        vals = torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound
                        p.copy_(vals.to(p.device))

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        steps: int = 5000,
        batch_size: int = 1024,
        lr: float = 1e-3,
        seed: int = 0,
        warm_start: bool = False,
        patience: int | None = None,
        check_every: int = 100,
        validation_fraction: float = 0.1,
        min_improvement: float = 1e-3,
        progress: bool = True,
    ) -> CLUB:
        """Fit q(y|x) by maximising the Gaussian log-likelihood with AdamW on random mini-batches.

        Deterministic for a seed: parameters are re-initialised from ``seed`` (unless ``warm_start``), and the
        held-out split and the batches are drawn from a generator seeded by it.

        ``patience=None`` (the paper's recipe): exactly ``steps`` steps on all pairs. With ``patience`` set
        (early stopping): a ``validation_fraction`` of the pairs is held out (the first
        ``round(validation_fraction · n)`` rows of ``torch.randperm(n)`` drawn from the seeded generator), its
        mean :meth:`log_likelihood` is evaluated every ``check_every`` steps and at the last one, training
        stops after ``patience`` evaluations without an improvement above ``min_improvement`` (absolute, in
        the objective's units), or at ``steps``; the weights of the best evaluation are restored.
        ``fit_info_.hyperparameters["early_stopping"]`` records the split, the best step and its held-out
        log-likelihood.
        """
        x, y = self._check_pairs(x, y)
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
        if patience is not None and (patience < 1 or check_every < 1 or not 0 < validation_fraction < 1):
            raise ValueError(
                f"early stopping needs patience >= 1, check_every >= 1 and 0 < validation_fraction < 1, got "
                f"{patience}, {check_every} and {validation_fraction}"
            )
        hyper: dict[str, Any] = {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "optimizer": "AdamW",
        }
        self._fitted = False  # until training completes
        if not warm_start:
            self.reset_parameters(seed)
        gen = torch.Generator().manual_seed(seed)
        full_x, full_y = x, y
        held_x = held_y = None
        if patience is not None:
            order = torch.randperm(x.shape[0], generator=gen).to(x.device)
            n_held = min(max(1, round(validation_fraction * x.shape[0])), x.shape[0] - 1)
            held_x, held_y = x[order[:n_held]], y[order[:n_held]]
            x, y = x[order[n_held:]], y[order[n_held:]]
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr)
        n = x.shape[0]
        batch = min(batch_size, n)
        best_ll, best_step, best_state, stale = -math.inf, 0, None, 0
        window_sum, window_len, last_window = 0.0, 0, math.nan
        steps_run, stopped_early = 0, False
        self.train()
        bar = tqdm(range(steps), desc="CLUB fit", disable=not progress, leave=False)
        for step in bar:
            idx = torch.randint(n, (batch,), generator=gen).to(x.device)
            loss = -self.log_likelihood(x[idx], y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps_run = step + 1
            window_sum += float(loss.detach())
            window_len += 1
            if window_len < check_every and steps_run < steps:
                continue
            last_window, window_sum, window_len = window_sum / window_len, 0.0, 0
            if held_x is None:
                bar.set_postfix(loss=f"{last_window:.4f}")
                continue
            with torch.no_grad():
                held_ll = float(self.log_likelihood(held_x, held_y))
            if held_ll > best_ll + min_improvement:
                best_ll, best_step, stale = held_ll, steps_run, 0
                best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            else:
                stale += 1
            bar.set_postfix(loss=f"{last_window:.4f}", heldout_ll=f"{held_ll:.4f}", best=f"{best_ll:.4f}")
            if stale >= patience:
                stopped_early = True
                break
        bar.close()
        if best_state is not None:
            self.load_state_dict(best_state)
        if held_x is not None:
            hyper["early_stopping"] = {
                "patience": patience,
                "check_every": check_every,
                "validation_fraction": validation_fraction,
                "min_improvement": min_improvement,
                "n_heldout": int(held_x.shape[0]),
                "steps_run": steps_run,
                "best_step": best_step,
                "best_heldout_log_likelihood": best_ll,
            }
        self.eval()
        self._fitted = True
        self.manifest_ = None  # new weights: no saved manifest describes them until save()
        self.fit_info_ = FitInfo(
            steps_run=steps_run,
            final_loss=last_window,
            stopped_early=stopped_early,
            data_fingerprint=fingerprint(full_x, full_y),
            hyperparameters=hyper,
        )
        return self

    # -- checkpoints -------------------------------------------------------------------------------
    def make_manifest(self, encoders: Mapping[str, Any]) -> CheckpointManifest:
        """A manifest for this estimator: its sizes, the given encoder spec and, if fitted, the fit data."""
        info = self.fit_info_
        return CheckpointManifest(
            x_dim=self.x_dim,
            y_dim=self.y_dim,
            hidden_size=self.hidden_size,
            encoders=dict(encoders),
            data_fingerprint=info.data_fingerprint if info else "",
            hyperparameters=dict(info.hyperparameters) if info else {},
        )

    def save(self, path: str | os.PathLike, manifest: CheckpointManifest) -> Path:
        """Write the state dict and ``manifest`` (its ``tensors_sha256`` set to the state dict's checksum) as
        one safetensors file, atomically."""
        from safetensors.torch import save_file

        if (manifest.x_dim, manifest.y_dim, manifest.hidden_size) != (
            self.x_dim,
            self.y_dim,
            self.hidden_size,
        ):
            raise ValueError("manifest sizes do not match this estimator")
        path = Path(path)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        manifest = replace(manifest, tensors_sha256=tensors_checksum(state))
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={MANIFEST_KEY: manifest.to_json()}))
        self.manifest_ = manifest
        return path

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        x_dim: int | None = None,
        y_dim: int | None = None,
        encoders: Mapping[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> CLUB:
        """Load the project's safetensors format (with manifest) or the paper's plain ``torch.save``
        state dict (no manifest; assumed trained on :data:`PAPER_ENCODERS`).

        Raises :class:`CheckpointError` for a missing, corrupt or wrongly shaped file (naming which tensor
        and why) and :class:`EncoderMismatchError` when ``encoders`` differs from what it was trained on.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"estimator checkpoint {path} does not exist")
        state, manifest = _read_checkpoint(path)
        if manifest is not None:
            _check_manifest(path, manifest, state)
        club = cls._from_state(path, state, x_dim=x_dim, y_dim=y_dim)
        club.manifest_ = manifest
        if encoders is not None:
            trained_on = manifest.encoders if manifest else PAPER_ENCODERS
            problems = encoder_mismatches(trained_on, encoders)
            if problems:
                origin = "its manifest" if manifest else "the paper's encoders (plain state dict)"
                raise EncoderMismatchError(
                    f"estimator {path} was trained on other encoders ({origin}): " + "; ".join(problems)
                )
        return club.to(map_location)

    @classmethod
    def _from_state(
        cls, path: Path, state: Mapping[str, torch.Tensor], *, x_dim: int | None, y_dim: int | None
    ) -> CLUB:
        required = [
            f"{net}.{i}.{p}" for net in ("p_mu", "p_logvar") for i in (0, 2) for p in ("weight", "bias")
        ]
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(f"{path} is not a CLUB state dict: missing {', '.join(missing)}")
        bad = [
            k
            for k in required
            if not isinstance(state[k], torch.Tensor) or state[k].ndim != k.count("weight") + 1
        ]
        if bad:
            raise CheckpointError(
                f"{path} is not a CLUB state dict: {', '.join(bad)} have the wrong number of dims"
            )
        half, ckpt_x = state["p_mu.0.weight"].shape
        ckpt_y = state["p_mu.2.weight"].shape[0]
        for name, want in ((" x_dim", (x_dim, ckpt_x)), (" y_dim", (y_dim, ckpt_y))):
            if want[0] is not None and want[0] != want[1]:
                raise CheckpointError(
                    f"{path} has{name}={want[1]} (p_mu.0.weight {tuple(state['p_mu.0.weight'].shape)}, "
                    f"p_mu.2.weight {tuple(state['p_mu.2.weight'].shape)}), but{name}={want[0]} was requested"
                )
        club = cls(ckpt_x, ckpt_y, 2 * half)
        expected = club.state_dict()
        for key, tensor in expected.items():
            got = state.get(key)
            if got is None or tuple(got.shape) != tuple(tensor.shape):
                shape = None if got is None else tuple(got.shape)
                raise CheckpointError(
                    f"{path}: tensor {key} has shape {shape}, expected {tuple(tensor.shape)}"
                )
            if not torch.isfinite(got).all():
                raise CheckpointError(f"{path}: tensor {key} contains NaN or inf")
        club.load_state_dict({k: state[k].to(torch.float32) for k in expected})
        club.eval()
        return club


def _check_manifest(path: Path, manifest: CheckpointManifest, state: Mapping[str, torch.Tensor]) -> None:
    """The manifest's checksum and sizes agree with the tensors (CheckpointError otherwise)."""
    if manifest.tensors_sha256 and manifest.tensors_sha256 != tensors_checksum(state):
        raise CheckpointError(
            f"{path}: its tensors do not match the checksum in its manifest (the file is corrupt or was "
            "modified after saving); re-train it (lmms-emi train-estimator) or copy it again"
        )
    w0, w2 = state.get("p_mu.0.weight"), state.get("p_mu.2.weight")
    if w0 is None or w2 is None or w0.ndim != 2 or w2.ndim != 2:
        return  # _from_state names the missing or malformed tensor
    found = {"x_dim": w0.shape[1], "y_dim": w2.shape[0], "hidden_size": 2 * w0.shape[0]}
    for key, value in found.items():
        declared = getattr(manifest, key)
        if (declared // 2 * 2 if key == "hidden_size" else declared) != value:  # odd sizes round down
            raise CheckpointError(
                f"{path}: its manifest says {key}={getattr(manifest, key)} but its tensors have "
                f"{key}={value}; the file is inconsistent, re-train or re-save it"
            )


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointManifest | None]:
    """Read a checkpoint file: safetensors (project format) first, then a plain torch state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        pass  # not safetensors: try the plain torch state dict below
    else:
        manifest = None
        if MANIFEST_KEY in metadata:
            try:
                manifest = CheckpointManifest.from_json(metadata[MANIFEST_KEY])
            except (ValueError, TypeError) as exc:
                raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
        return state, manifest
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt archives
        reason = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({reason})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state), None
