"""The fast CLUB fit: a closed-form linear-Gaussian start embedded in the CLUB's MLPs, then a short full-batch
refinement, both chosen on a held-out split.

:func:`fast_fit` fits the two heads of :class:`~lmms_emi.estimators.club.CLUB` (``p_mu``, ``p_logvar``:
``Linear(x_dim, k) → Tanh → Linear(k, y_dim)``, the log-variance head ending in a Tanh) in place:

1. split (seeded, as the paper recipe's early stopping does; :func:`~.training.split_pairs`): the first
   ``round(validation_fraction · n)`` rows of ``torch.randperm(n)`` are held out, the rest train;
2. ridge regression y ≈ W(x − x̄) + ȳ on the train rows, its λ picked on a grid by the held-out Gaussian
   log-likelihood (one SVD gives every λ). The residual variance of each output dimension (corrected for the
   fit's degrees of freedom) gives log σ²_d, clamped to the Tanh's range (−1, 1);
3. the linear map is embedded in ``p_mu``: W has rank up to min(x_dim, y_dim) but the head has k hidden
   units, so it is first reduced to rank ≤ k (the top principal directions of the fitted values, each output
   dimension scaled by 1/σ_d: the directions that matter most for the likelihood). The first layer maps x onto
   those directions, centred and scaled to a pre-activation of std ``PRE_ACTIVATION_STD`` (0.01), where
   tanh(u) = u(1 − u²/3 + …) is the identity to ~1e-4; the second layer undoes the scale, so μ(x) is the
   reduced ridge map (near-exact: held-out log-likelihoods agree to ~1e-5 relative). The ridge solution on
   the actual tanh features (λ picked on the held-out rows again) is the alternative second layer; the better
   of the two on the held-out rows is kept. ``p_logvar`` outputs the constant clamped log σ²: its last
   layer's weights are 0 and its bias is atanh(log σ²); its first layer and the unused hidden units of
   ``p_mu`` keep their seeded default init (outgoing weights 0), so the refinement can use them;
4. a short full-batch Adam refinement of the log-likelihood on the train rows (at most
   ``FAST_REFINE_STEPS``), with the held-out log-likelihood checked after every step; it stops after
   ``patience`` steps without an improvement above ``min_improvement`` (None: runs them all), and the best
   weights (the closed form's included) are restored (:class:`~lmms_emi.estimators.training.HeldoutMonitor`).

Everything is deterministic for a seed (float64 linear algebra, one seeded generator, no sampling after the
split). This module knows the CLUB only through its ``p_mu`` / ``p_logvar`` heads and ``log_likelihood``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from lmms_emi.estimators.training import HeldoutMonitor, split_pairs

__all__ = ["FAST_REFINE_LR", "FAST_REFINE_STEPS", "FastFitResult", "fast_fit"]

FAST_REFINE_STEPS = 40  # full-batch refinement steps at most (fewer when ``steps`` is smaller)
FAST_REFINE_LR = 1e-4
LOGVAR_BOUND = 1 - 1e-6  # log σ² is clamped to ±this: tanh's range, with atanh finite in float32 (±7.25)
PRE_ACTIVATION_STD = 0.01  # std of the embedded hidden units' pre-activation: tanh(u) = u(1 − u²/3 + ...)
_LAMBDAS = torch.logspace(-6, 3, 28, dtype=torch.float64)  # ridge λ / the mean squared singular value


class _Club(Protocol):
    p_mu: nn.Sequential
    p_logvar: nn.Sequential

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any: ...


@dataclass(frozen=True)
class FastFitResult:
    """What :func:`fast_fit` did: refinement steps run, whether the plateau stop fired, the hyperparameters
    (the split, the ridge λs, the rank of the embedded map, the held-out log-likelihoods)."""

    steps_run: int
    final_loss: float
    stopped_early: bool
    hyperparameters: dict[str, Any]


def _gauss_ll(pred: torch.Tensor, y: torch.Tensor, logvar: torch.Tensor) -> float:
    """The CLUB objective (mean over rows of Σ_d −r²/σ² − log σ²) for a constant log σ² per dimension."""
    return float(_row_ll(pred, y, logvar).mean())


def _row_ll(pred: torch.Tensor, y: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-((y - pred) ** 2) * torch.exp(-logvar) - logvar).sum(dim=1)


def _clamped_logvar(rss: torch.Tensor, dof: float) -> torch.Tensor:
    var = rss / max(dof, 1.0)
    return torch.log(var.clamp_min(1e-30)).clamp(-LOGVAR_BOUND, LOGVAR_BOUND)


def _ridge(
    f_train: torch.Tensor, y_train: torch.Tensor, f_held: torch.Tensor, y_held: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Ridge regression of centred y on centred features, λ picked on the held-out rows by the Gaussian
    log-likelihood with the dof-corrected residual variance: the smallest λ of the grid whose held-out
    log-likelihood is within one standard error (of the per-row difference) of the best one's. The CLUB being
    reproduced is the unregularised maximum-likelihood fit, so it is shrunk only as much as the held-out rows
    can tell apart (shrinking μ more than that changes Î, not the likelihood). Returns (coefficients (p, d_y),
    clamped log σ² (d_y), λ relative to the mean squared singular value, held-out log-likelihood); float64."""
    n = f_train.shape[0]
    u, s, vh = torch.linalg.svd(f_train, full_matrices=False)
    uty = u.T @ y_train  # (r, d_y)
    proj_held = f_held @ vh.T  # (n_held, r)
    scale = float((s**2).mean()) if s.numel() and float(s.max()) > 0 else 1.0  # λ = rel · scale > 0
    ss_y = (y_train**2).sum(dim=0)
    fits: list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for rel in _LAMBDAS.tolist():
        shrink = s**2 / (s**2 + rel * scale)
        fitted_uty = shrink[:, None] * uty
        # RSS_d = |y|² − 2 yᵀŷ + |ŷ|², all in the U basis (ŷ = U diag(shrink) Uᵀy)
        rss = ss_y - 2 * (uty * fitted_uty).sum(0) + (fitted_uty**2).sum(0)
        logvar = _clamped_logvar(rss.clamp_min(0), n - float(shrink.sum()))
        pred = proj_held @ ((s / (s**2 + rel * scale))[:, None] * uty)
        fits.append((rel, _row_ll(pred, y_held, logvar), logvar, (s / (s**2 + rel * scale))[:, None] * uty))
    best = max(fits, key=lambda f: float(f[1].mean()))[1]
    for rel, rows, logvar, coef_v in fits:  # λ ascending: the first within one standard error of the best
        diff = rows - best
        se = float(diff.std(correction=0)) / math.sqrt(diff.numel())
        if float(diff.mean()) >= -se:
            return vh.T @ coef_v, logvar, rel, float(rows.mean())
    raise AssertionError("unreachable: the best λ is within 0 of itself")


@torch.no_grad()
def _closed_form_start(
    club: _Club, x: torch.Tensor, y: torch.Tensor, x_held: torch.Tensor, y_held: torch.Tensor
) -> dict[str, Any]:
    """Steps 2-3 of the module docstring: set the heads to the embedded linear-Gaussian fit."""
    mu_in, mu_out = club.p_mu[0], club.p_mu[2]
    lv_out = club.p_logvar[2]
    device, k = mu_in.weight.device, mu_in.out_features
    xd, yd, xh, yh = (t.to(torch.float64) for t in (x, y, x_held, y_held))
    x_mean, y_mean = xd.mean(0), yd.mean(0)
    xc, yc, xhc, yhc = xd - x_mean, yd - y_mean, xh - x_mean, yh - y_mean
    coef, logvar, lam, linear_ll = _ridge(xc, yc, xhc, yhc)  # coef: (x_dim, y_dim)
    # reduce to rank <= k in the metric of the likelihood (outputs scaled by 1/σ)
    sigma = torch.exp(0.5 * logvar)
    _, sv, vh = torch.linalg.svd((xc @ coef) / sigma, full_matrices=False)
    rank = int(min(k, int((sv > sv[0] * 1e-7).sum()) if sv.numel() and sv[0] > 0 else 0))
    proj = (coef / sigma) @ vh[:rank].T  # (x_dim, rank): the hidden units' directions
    pre_std = (xc @ proj).std(dim=0, correction=0).clamp_min(1e-12)
    proj = proj * (PRE_ACTIVATION_STD / pre_std)
    w1 = mu_in.weight.detach().to(torch.float64).clone()
    b1 = mu_in.bias.detach().to(torch.float64).clone()
    w1[:rank], b1[:rank] = proj.T, -(x_mean @ proj)
    h_train = torch.tanh(xd @ w1[:rank].T + b1[:rank])
    h_held = torch.tanh(xh @ w1[:rank].T + b1[:rank])
    # two second layers: the exact embedding of the rank-reduced ridge map (tanh(c·u)/c ≈ u), and the ridge
    # solution on the tanh features; the one with the better held-out log-likelihood is kept
    h_mean = h_train.mean(0)
    coef2, logvar2, lam2, refit_ll = _ridge(h_train - h_mean, yc, h_held - h_mean, yhc)
    exact = (vh[:rank] * sigma) * (pre_std / PRE_ACTIVATION_STD)[:, None]  # (rank, y_dim)
    exact_ll = _gauss_ll(h_held @ exact + y_mean, yh, logvar)
    if exact_ll >= refit_ll:
        coef2, logvar2, b2, embedded_ll, how = exact, logvar, y_mean, exact_ll, "exact"
    else:
        b2, embedded_ll, how = y_mean - h_mean @ coef2, refit_ll, "refit"
    w2 = torch.zeros(mu_out.out_features, k, dtype=torch.float64)
    w2[:, :rank] = coef2.T
    mu_in.weight.copy_(w1.to(device, torch.float32))
    mu_in.bias.copy_(b1.to(device, torch.float32))
    mu_out.weight.copy_(w2.to(device, torch.float32))
    mu_out.bias.copy_(b2.to(device, torch.float32))
    lv_out.weight.zero_()
    lv_out.bias.copy_(torch.atanh(logvar2).to(device, torch.float32))
    return {
        "ridge_lambda": lam,
        "linear_heldout_log_likelihood": linear_ll,
        "rank": rank,
        "embedding": how,
        "embedded_ridge_lambda": lam2 if how == "refit" else None,
        "embedded_heldout_log_likelihood": embedded_ll,
    }


@torch.no_grad()
def _adam_step(
    params: list[torch.Tensor],
    grads: tuple[torch.Tensor, ...],
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    t: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One Adam step (Kingma & Ba), written out: ``torch.optim`` imports torch._dynamo on first use (~2 s)."""
    b1, b2 = betas
    for p, g, (m, v) in zip(params, grads, moments, strict=True):
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, (v / (1 - b2**t)).sqrt_().add_(eps), value=-lr / (1 - b1**t))


def fast_fit(
    club: _Club,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gen: torch.Generator,
    steps: int,
    patience: int | None,
    validation_fraction: float,
    min_improvement: float,
    lr: float = FAST_REFINE_LR,
) -> FastFitResult:
    """Fit ``club``'s heads in place (module docstring); ``gen`` draws the split, ``steps`` caps the
    refinement at ``min(steps, FAST_REFINE_STEPS)`` full-batch steps, ``patience`` None runs them all."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"the fast fit needs 0 < validation_fraction < 1, got {validation_fraction}")
    (x, y), (held_x, held_y) = split_pairs(x, y, validation_fraction, gen, what="a CLUB")
    info = _closed_form_start(club, x, y, held_x, held_y)
    with torch.no_grad():
        start_ll = float(club.log_likelihood(held_x, held_y))
    info["closed_form_heldout_log_likelihood"] = start_ll
    monitor = HeldoutMonitor(club, patience=patience, min_improvement=min_improvement)
    monitor.baseline(start_ll)  # the closed form is the refinement's step 0
    steps_run, loss = 0, math.nan
    params = list(club.parameters())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in range(min(steps, FAST_REFINE_STEPS)):
        objective = -club.log_likelihood(x, y)
        _adam_step(params, torch.autograd.grad(objective, params), moments, lr, step + 1)
        steps_run, loss = step + 1, float(objective.detach())
        with torch.no_grad():
            monitor.observe(float(club.log_likelihood(held_x, held_y)), steps_run)
        if monitor.exhausted:
            break
    monitor.restore()
    hyper = {
        "refine_steps": min(steps, FAST_REFINE_STEPS),
        "refine_lr": lr,
        "refine_optimizer": "Adam (full batch, no weight decay)",
        "patience": patience,
        "validation_fraction": validation_fraction,
        "min_improvement": min_improvement,
        "n_heldout": int(held_x.shape[0]),
        "steps_run": steps_run,
        "best_step": monitor.best_step,
        "best_heldout_log_likelihood": monitor.best,
        **info,
    }
    return FastFitResult(steps_run, loss, monitor.exhausted, hyper)
