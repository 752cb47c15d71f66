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
from dataclasses import dataclass

import torch

LN2 = math.log(2.0)

__all__ = [
    "LN2",
    "DensityMatrix",
    "rjsd",
    "rjsd_between",
    "rjsd_from_covariances",
    "second_moment",
    "von_neumann_entropy",
]


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


@dataclass(frozen=True)
class DensityMatrix:
    """A trace-normalised second-moment matrix Ĉ with its von Neumann entropy, computed once.

    From a sample, Ĉ = FᵀF with factor F = X / √tr(XᵀX) (n, d). When n < d the non-zero eigenvalues of Ĉ
    are those of the n×n Gram matrix FFᵀ, and the mixture (Ĉ_X + Ĉ_Y)/2 = ZᵀZ with Z = [F_X; F_Y]/√2 has
    those of the (n+m)×(n+m) matrix ZZᵀ, so small samples of wide embeddings (90 × 768) never
    decompose a d×d matrix. Comparing one sample against many then costs one decomposition per pair.
    """

    entropy: float
    matrix: torch.Tensor | None = None  # Ĉ (d, d), when built from a covariance or n ≥ d
    factor: torch.Tensor | None = None  # F (n, d), when built from a sample with n < d

    @classmethod
    def of_covariance(cls, cov: torch.Tensor) -> DensityMatrix:
        """From a (d, d) second-moment matrix, raw (XᵀX) or already trace-normalised."""
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"a covariance must be square, got shape {tuple(cov.shape)}")
        cov = cov.to(torch.float64)
        trace = torch.trace(cov)
        if trace <= 0:
            raise ValueError("a covariance has zero trace (all-zero embeddings)")
        cov = cov / trace
        return cls(von_neumann_entropy(cov), matrix=cov)

    @classmethod
    def of_sample(cls, x: torch.Tensor) -> DensityMatrix:
        """From a sample of embeddings (rows)."""
        x = _check_sample(x, "x").to(torch.float64)
        n, d = x.shape
        if n >= d:
            return cls.of_covariance(x.T @ x)
        norm2 = (x * x).sum()
        if norm2 <= 0:
            raise ValueError("x has only zero rows: its second moment has zero trace")
        factor = x / torch.sqrt(norm2)
        return cls(von_neumann_entropy(factor @ factor.T), factor=factor)

    @property
    def dim(self) -> int:
        return int((self.matrix if self.matrix is not None else self.factor).shape[1])

    def full(self) -> torch.Tensor:
        """Ĉ as a (d, d) matrix."""
        return self.matrix if self.matrix is not None else self.factor.T @ self.factor


def _mixture_entropy(a: DensityMatrix, b: DensityMatrix) -> float:
    """S((Ĉ_A + Ĉ_B)/2), through the smaller of the Gram and the d×d form."""
    if a.factor is not None and b.factor is not None and a.factor.shape[0] + b.factor.shape[0] < a.dim:
        z = torch.cat([a.factor, b.factor]) / 2**0.5
        return von_neumann_entropy(z @ z.T)
    return von_neumann_entropy((a.full() + b.full()) / 2)


def rjsd_between(a: DensityMatrix, b: DensityMatrix) -> float:
    """RJSD = S((A + B)/2) − (S(A) + S(B))/2, clipped to [0, ln 2], its exact range, to remove float
    round-off (of order 1e-15)."""
    if a.dim != b.dim:
        raise ValueError(f"dimensions differ: {a.dim} and {b.dim}")
    value = _mixture_entropy(a, b) - (a.entropy + b.entropy) / 2
    return min(max(value, 0.0), LN2)


def rjsd_from_covariances(c_x: torch.Tensor, c_y: torch.Tensor) -> float:
    """RJSD from two (d, d) second-moment matrices (each is trace-normalised here, so raw XᵀX works too).

    RJSD = S((Ĉ_X + Ĉ_Y)/2) − (S(Ĉ_X) + S(Ĉ_Y))/2 with Ĉ = C / tr(C).
    """
    if c_x.shape != c_y.shape:
        raise ValueError(f"covariances must have equal shape, got {tuple(c_x.shape)} and {tuple(c_y.shape)}")
    return rjsd_between(DensityMatrix.of_covariance(c_x), DensityMatrix.of_covariance(c_y))


def rjsd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Representation Jensen-Shannon divergence (nats) between samples ``x`` (n, d) and ``y`` (m, d):

        RJSD = S((Ĉ_X + Ĉ_Y)/2) − (S(Ĉ_X) + S(Ĉ_Y))/2,   Ĉ_X = XᵀX / tr(XᵀX),   S(C) = −Σ λ ln λ.

    Orthogonal samples have Ĉ_X = e₁e₁ᵀ, Ĉ_Y = e₂e₂ᵀ (entropy 0) and a mixture with eigenvalues ½, ½, so
    exactly ln 2, the maximum; identical samples give 0:

    >>> import math
    >>> rjsd(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])) == math.log(2)
    True
    >>> x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    >>> rjsd(x, x)
    0.0
    """
    x = _check_sample(x, "x")
    y = _check_sample(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return rjsd_between(DensityMatrix.of_sample(x), DensityMatrix.of_sample(y))
