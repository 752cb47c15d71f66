"""Representation Jensen-Shannon divergence (RJSD) between two samples of embeddings.

For a sample X (rows are embeddings) let C_X = XᵀX / tr(XᵀX) be its trace-normalised uncentred covariance
(second-moment matrix): a density matrix (symmetric, PSD, unit trace). With the von Neumann entropy
S(C) = −Σ_k λ_k ln λ_k over the non-zero eigenvalues λ_k of C,

    RJSD(X, Y) = S((C_X + C_Y) / 2) − (S(C_X) + S(C_Y)) / 2        (nats, in [0, ln 2]).

Trace-normalising each covariance *before* mixing gives each sample equal weight, so the value does not
depend on the sample sizes (repeating every row of X leaves it unchanged).

What the estimate sees: with this linear kernel only the second moments of the embeddings enter, so two
distributions with equal second moments have RJSD 0 even when they differ (e.g. {e1, e2} and
{(e1+e2)/√2, (e1−e2)/√2}). By data processing, RJSD is therefore a lower bound on the Jensen-Shannon
divergence of the embedding distributions, not an estimate of it.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)

__all__ = ["LN2", "rjsd", "rjsd_from_covariances", "second_moment", "von_neumann_entropy"]


def _check_sample(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (rows are samples), got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has no rows")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """Trace-normalised uncentred covariance C = XᵀX / tr(XᵀX), a (d, d) float64 density matrix."""
    x = _check_sample(x, "x").to(torch.float64)
    cov = x.T @ x
    trace = torch.trace(cov)
    if trace <= 0:
        raise ValueError("x has only zero rows: its second moment has zero trace")
    return cov / trace


def von_neumann_entropy(c: torch.Tensor) -> float:
    """S(C) = −Σ λ ln λ over the positive eigenvalues of the symmetric PSD matrix C, renormalised to sum 1.

    Eigenvalues are computed in float64; zero (and round-off negative) eigenvalues are skipped.
    """
    eig = torch.linalg.eigvalsh(c.to(torch.float64))
    eig = eig[eig > 0]
    eig = eig / eig.sum()
    return float(-(eig * torch.log(eig)).sum())


def rjsd_from_covariances(c_x: torch.Tensor, c_y: torch.Tensor) -> float:
    """RJSD from two (d, d) second-moment matrices (each is trace-normalised here, so raw XᵀX works too).

    RJSD = S((Ĉ_X + Ĉ_Y)/2) − (S(Ĉ_X) + S(Ĉ_Y))/2 with Ĉ = C / tr(C). The result is clipped to [0, ln 2],
    its exact range, to remove float round-off (of order 1e-15).
    """
    if c_x.ndim != 2 or c_x.shape[0] != c_x.shape[1] or c_x.shape != c_y.shape:
        raise ValueError(
            f"covariances must be square and of equal shape, got {tuple(c_x.shape)} and {tuple(c_y.shape)}"
        )
    c_x = c_x.to(torch.float64)
    c_y = c_y.to(torch.float64)
    tr_x, tr_y = torch.trace(c_x), torch.trace(c_y)
    if tr_x <= 0 or tr_y <= 0:
        raise ValueError("a covariance has zero trace (all-zero embeddings)")
    c_x, c_y = c_x / tr_x, c_y / tr_y
    value = von_neumann_entropy((c_x + c_y) / 2) - (von_neumann_entropy(c_x) + von_neumann_entropy(c_y)) / 2
    return min(max(value, 0.0), LN2)


def rjsd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Representation Jensen-Shannon divergence (nats) between samples ``x`` (n, d) and ``y`` (m, d)."""
    x = _check_sample(x, "x")
    y = _check_sample(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return rjsd_from_covariances(second_moment(x), second_moment(y))
