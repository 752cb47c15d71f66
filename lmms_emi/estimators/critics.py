"""Critics f(x, y) for the variational MI bounds of :mod:`~lmms_emi.estimators.mi_bounds`: small MLPs that
score every pair of a sample, as an N×N matrix, never an N×N×d tensor.

- :class:`SeparableCritic`: f(x, y) = g(x)ᵀ h(y) with two MLPs g, h: R^d → R^k. All N² scores are one matrix
  product G Hᵀ of the (N, k) embeddings: O(N·d·hidden + N²·k), the default.
- :class:`ConcatCritic`: f(x, y) = MLP([x; y]), more expressive, O(N²·hidden²). Its first layer is split,
  W[x; y] = W_x x + W_y y, so the (N, hidden) projections of the rows are computed once and the pairs' hidden
  units are formed over blocks of rows (:data:`PAIR_BUDGET` elements at a time).

Both MLPs are ``Linear → ReLU → Linear → ReLU → Linear`` (PyTorch's default init; the estimator re-draws it
from a seed).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CRITICS", "PAIR_BUDGET", "ConcatCritic", "SeparableCritic", "make_critic"]

#: Elements of the (rows, N, hidden) pair block a :class:`ConcatCritic` forms at once.
PAIR_BUDGET = 1 << 22


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out)
    )


class SeparableCritic(nn.Module):
    """f(x, y) = g(x)ᵀ h(y); ``scores(x, y)`` is the (N_x, N_y) matrix G Hᵀ."""

    def __init__(self, x_dim: int, y_dim: int, hidden_size: int = 256, embed_dim: int = 128) -> None:
        super().__init__()
        self.g = _mlp(x_dim, hidden_size, embed_dim)
        self.h = _mlp(y_dim, hidden_size, embed_dim)

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """S_ij = f(x_i, y_j)."""
        return self.g(x) @ self.h(y).T

    def pair_scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f(x_i, y_i) for paired rows: the diagonal of :meth:`scores`, in O(N)."""
        return (self.g(x) * self.h(y)).sum(dim=1)


class ConcatCritic(nn.Module):
    """f(x, y) = MLP([x; y]); ``scores(x, y)`` forms the pairs' first hidden layer over blocks of rows."""

    def __init__(self, x_dim: int, y_dim: int, hidden_size: int = 256, embed_dim: int = 128) -> None:
        super().__init__()
        self.x_dim = x_dim
        self.net = _mlp(x_dim + y_dim, hidden_size, 1)
        self.embed_dim = embed_dim  # unused: kept so both critics take the same sizes

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """S_ij = f(x_i, y_j): first layer W_x x_i + W_y y_j + b, then the rest of the MLP per block."""
        first, rest = self.net[0], self.net[1:]
        px = x @ first.weight[:, : self.x_dim].T + first.bias  # (N_x, hidden)
        py = y @ first.weight[:, self.x_dim :].T  # (N_y, hidden)
        rows = max(1, PAIR_BUDGET // max(1, py.shape[0] * py.shape[1]))
        blocks = [
            rest(px[i : i + rows, None, :] + py[None, :, :]).squeeze(-1) for i in range(0, px.shape[0], rows)
        ]
        return torch.cat(blocks) if blocks else px.new_zeros(0, py.shape[0])

    def pair_scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """f(x_i, y_i) for paired rows."""
        return self.net(torch.cat([x, y], dim=1)).squeeze(-1)


#: The critics by name.
CRITICS: dict[str, type[nn.Module]] = {"separable": SeparableCritic, "concat": ConcatCritic}


def make_critic(kind: str, x_dim: int, y_dim: int, hidden_size: int, embed_dim: int) -> nn.Module:
    """A critic of ``kind`` ("separable" or "concat")."""
    if kind not in CRITICS:
        raise ValueError(f"unknown critic {kind!r}: one of {', '.join(CRITICS)}")
    return CRITICS[kind](x_dim, y_dim, hidden_size, embed_dim)
