"""The fixed random projection that makes the two encoders' dimensions equal.

When the vision and text features differ in dimension, the larger one is mapped onto the smaller with a
Gaussian random projection (Johnson-Lindenstrauss) ``P = G / sqrt(k)``, ``G_ij ~ N(0, 1)`` drawn from
``numpy.random.default_rng(seed)`` (default seed :data:`DEFAULT_PROJECTION_SEED` = 0), so that the query
average ``(z_v + z_t) / 2`` is defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DEFAULT_PROJECTION_SEED = 0


@dataclass(frozen=True)
class RandomProjection:
    """``x -> x @ G / sqrt(out_dim)``, ``G ~ N(0, 1)^{in_dim x out_dim}`` from ``default_rng(seed)``."""

    modality: str  # "vision" or "text": which side is projected
    in_dim: int
    out_dim: int
    seed: int

    def matrix(self) -> torch.Tensor:
        g = np.random.default_rng(self.seed).standard_normal((self.in_dim, self.out_dim))
        return torch.from_numpy((g / np.sqrt(self.out_dim)).astype(np.float32))

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "gaussian",
            "seed": self.seed,
            "modality": self.modality,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
        }


def projections_for(vision_dim: int, text_dim: int, seed: int) -> dict[str, RandomProjection]:
    """The projection of the larger encoder dimension onto the smaller one, by the modality it applies to
    (``"image"`` or ``"text"``); none when the dimensions are equal."""
    if vision_dim > text_dim:
        return {"image": RandomProjection("vision", vision_dim, text_dim, seed)}
    if text_dim > vision_dim:
        return {"text": RandomProjection("text", text_dim, vision_dim, seed)}
    return {}
