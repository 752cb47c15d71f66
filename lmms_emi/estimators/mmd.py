"""Maximum mean discrepancy (MMD) between two samples of embeddings, with a Gaussian kernel.

With the Gaussian (RBF) kernel k(a, b) = exp(−|a − b|² / (2σ²)), samples X (n rows) and Y (m rows):

    MMD²_b(X, Y) = 1/n² Σ_ij k(x_i, x_j) + 1/m² Σ_ij k(y_i, y_j) − 2/(nm) Σ_ij k(x_i, y_j)

the **biased** (V-statistic) estimator: the squared RKHS distance between the two empirical mean
embeddings, so it is ≥ 0 always and exactly 0 for identical samples (the bound's D^½ and D^¼ need D ≥ 0; the
unbiased U-statistic, which drops the i = j terms, can be negative, and is offered by
``mmd_squared(..., unbiased=True)``). Since 0 < k ≤ 1, MMD²_b ∈ [0, 2].

**Bandwidth rule** (median heuristic): σ = the median Euclidean distance between distinct rows of the
pooled sample [X; Y] (the lower middle value for an even count; computed on the first
:data:`MEDIAN_ROWS` rows of a seeded permutation when the pool is larger). A pool whose rows are all equal
has median 0; σ = 1 then (every kernel value is 1 and MMD² = 0 whatever σ). A given ``bandwidth`` overrides
the rule.

Two point masses a ≠ b with n = m ≥ 2 rows each: of the (2n choose 2) pairs, n² are across (distance
|a − b|) and n(n − 1) within (distance 0), so the median is |a − b| = σ, k(a, b) = e^{−½} and
MMD²_b = 1 + 1 − 2e^{−½} ≈ 0.787 whatever |a − b|.

The kernel sums are computed over blocks of rows (no (n+m)×(n+m) matrix beyond :data:`BLOCK_ROWS` rows at a
time).
"""

from __future__ import annotations

import math

import torch

__all__ = ["BLOCK_ROWS", "MEDIAN_ROWS", "MMD_MAX", "gaussian_kernel_sum", "median_bandwidth", "mmd_squared"]

#: Rows of the pooled sample whose pairwise distances give the median bandwidth.
MEDIAN_ROWS = 4096
#: Rows per block of the kernel sums.
BLOCK_ROWS = 2048
#: The largest MMD²_b with a kernel bounded by 1 (two far-apart point masses).
MMD_MAX = 2.0
_MEDIAN_SEED = 0


def _check_sample(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a 2-D tensor with rows (samples), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x.to(torch.float64)


def median_bandwidth(pooled: torch.Tensor) -> float:
    """σ of the median heuristic: the median distance between distinct rows of ``pooled`` (1.0 when it is 0).

    >>> median_bandwidth(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]))  # distances 5, 0, 5
    5.0
    """
    z = _check_sample(pooled, "pooled")
    if z.shape[0] < 2:
        return 1.0
    if z.shape[0] > MEDIAN_ROWS:
        gen = torch.Generator().manual_seed(_MEDIAN_SEED)
        z = z[torch.randperm(z.shape[0], generator=gen)[:MEDIAN_ROWS].to(z.device)]
    dist = torch.cdist(z, z)
    i, j = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    median = float(dist[i, j].median())
    return median if median > 0 else 1.0


def gaussian_kernel_sum(
    a: torch.Tensor, b: torch.Tensor, bandwidth: float, *, skip_diagonal: bool = False
) -> float:
    """Σ_ij exp(−|a_i − b_j|² / (2σ²)) over blocks of rows (``skip_diagonal``: without i = j, for a = b)."""
    total = 0.0
    scale = -1.0 / (2.0 * bandwidth**2)
    for start in range(0, a.shape[0], BLOCK_ROWS):
        block = torch.exp(torch.cdist(a[start : start + BLOCK_ROWS], b).square_().mul_(scale))
        if skip_diagonal:
            rows = torch.arange(block.shape[0], device=block.device)
            block[rows, rows + start] = 0.0
        total += float(block.sum())
    return total


def mmd_squared(
    x: torch.Tensor, y: torch.Tensor, *, bandwidth: float | None = None, unbiased: bool = False
) -> float:
    """MMD² between samples ``x`` (n, d) and ``y`` (m, d) with the Gaussian kernel of bandwidth σ (default:
    the median heuristic on the pooled rows; see the module docstring), nats-free (a squared RKHS norm).

        biased:   1/n² Σ k(x_i, x_j) + 1/m² Σ k(y_i, y_j) − 2/(nm) Σ k(x_i, y_j)      ∈ [0, 2]
        unbiased: 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/(nm) Σ k(x_i, y_j)

    The biased value is clipped at 0 (round-off only: it is a squared norm).

    >>> a, b = torch.tensor([[0.0, 0.0]] * 2), torch.tensor([[3.0, 4.0]] * 2)
    >>> mmd_squared(a, b) == 2 - 2 * math.exp(-0.5), mmd_squared(a, a)
    (True, 0.0)
    """
    x, y = _check_sample(x, "x"), _check_sample(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if unbiased and min(n, m) < 2:
        raise ValueError("the unbiased MMD² needs at least 2 rows in each sample")
    sigma = median_bandwidth(torch.cat([x, y])) if bandwidth is None else float(bandwidth)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"the bandwidth must be a positive number, got {bandwidth}")
    cross = gaussian_kernel_sum(x, y, sigma) / (n * m)
    if unbiased:
        xx = gaussian_kernel_sum(x, x, sigma, skip_diagonal=True) / (n * (n - 1))
        yy = gaussian_kernel_sum(y, y, sigma, skip_diagonal=True) / (m * (m - 1))
        return xx + yy - 2 * cross
    xx = gaussian_kernel_sum(x, x, sigma) / (n * n)
    yy = gaussian_kernel_sum(y, y, sigma) / (m * m)
    return min(max(xx + yy - 2 * cross, 0.0), MMD_MAX)
