"""The MI and JSD estimator families, by name: the one small interface an MI estimator offers, and the
registries the ``--mi-estimator`` / ``--jsd-estimator`` options choose from.

MI estimators (:data:`MI_ESTIMATORS`): ``club`` (the default, the paper's: an upper-bound style estimate from
a Gaussian q(y|x), :class:`~lmms_emi.estimators.club.CLUB`), and the critic-based lower bounds ``infonce``,
``nwj`` and ``mine`` (:class:`~lmms_emi.estimators.critic_mi.CriticMI`). Each satisfies :class:`MIEstimator`:

- ``fit(x, y, *, steps, seed, patience, check_every, validation_fraction, min_improvement, progress)`` →
  the estimator (seeded init, seeded held-out split, best held-out weights restored);
- ``mutual_information(x, y) -> float`` (nats; ``estimate`` on the critic estimators is the same);
- ``make_manifest(encoders)``, ``save(path, manifest)`` and the class's ``from_checkpoint(path, *,
  encoders)``: one safetensors file with the manifest and the tensors' sha256
  (:mod:`~lmms_emi.estimators.checkpoint`); :func:`load_mi_estimator` reads either kind.

JSD estimators (:data:`JSD_ESTIMATORS`): ``rjsd`` (the default, :func:`~lmms_emi.estimators.rjsd.rjsd`,
in [0, ln 2]) and ``mmd`` (biased MMD² with a Gaussian kernel and the median-heuristic bandwidth,
:func:`~lmms_emi.estimators.mmd.mmd_squared`, in [0, 2]): functions of two samples, the divergence terms of
the EMID bound. :data:`JSD_RANGES` holds each one's range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lmms_emi.errors import CheckpointError
from lmms_emi.estimators.checkpoint import CRITIC_FORMAT_NAME, MANIFEST_KEY
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.estimators.mmd import MMD_MAX, mmd_squared
from lmms_emi.estimators.rjsd import rjsd

__all__ = [
    "DEFAULT_JSD_ESTIMATOR",
    "DEFAULT_MI_ESTIMATOR",
    "JSD_ESTIMATORS",
    "JSD_RANGES",
    "MI_ESTIMATORS",
    "MIEstimator",
    "checkpoint_estimator_name",
    "load_mi_estimator",
    "make_mi_estimator",
    "mi_estimator_name",
]

DEFAULT_MI_ESTIMATOR = "club"
DEFAULT_JSD_ESTIMATOR = "rjsd"


@runtime_checkable
class MIEstimator(Protocol):
    """What every MI estimator offers (see the module docstring)."""

    x_dim: int
    y_dim: int

    def fit(self, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> MIEstimator: ...

    def mutual_information(self, x: torch.Tensor, y: torch.Tensor) -> float: ...

    def make_manifest(self, encoders: Mapping[str, Any]) -> Any: ...

    def save(self, path: str | os.PathLike, manifest: Any) -> Path: ...


def _critic(bound: str) -> Callable[[int, int], CriticMI]:
    def make(x_dim: int, y_dim: int) -> CriticMI:
        return CriticMI(x_dim, y_dim, bound=bound)

    make.__doc__ = f"A {bound} estimator (separable critic, 256 hidden units, 128-dim embeddings)."
    return make


def _club(x_dim: int, y_dim: int) -> CLUB:
    """A CLUB with the paper's 500 hidden units."""
    return CLUB(x_dim, y_dim, 500)


#: MI estimators by name: a factory (x_dim, y_dim) -> an unfitted estimator.
MI_ESTIMATORS: dict[str, Callable[[int, int], MIEstimator]] = {
    "club": _club,
    "infonce": _critic("infonce"),
    "nwj": _critic("nwj"),
    "mine": _critic("mine"),
}

#: JSD estimators by name: a function of two samples (n, d), (m, d) -> a divergence.
JSD_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "rjsd": rjsd,
    "mmd": mmd_squared,
}

#: The range of each JSD estimator's values (the plausibility check and the bound's largest value).
JSD_RANGES: dict[str, tuple[float, float]] = {"rjsd": (0.0, math.log(2.0)), "mmd": (0.0, MMD_MAX)}


def make_mi_estimator(name: str, x_dim: int, y_dim: int) -> MIEstimator:
    """An unfitted estimator ``name`` of :data:`MI_ESTIMATORS` (ValueError listing the names otherwise)."""
    if name not in MI_ESTIMATORS:
        raise ValueError(f"unknown MI estimator {name!r}: one of {', '.join(MI_ESTIMATORS)}")
    return MI_ESTIMATORS[name](x_dim, y_dim)


def mi_estimator_name(estimator: Any) -> str:
    """The registered name of an estimator object: ``club`` for a CLUB, the bound of a critic estimator."""
    if isinstance(estimator, CriticMI):
        return estimator.name
    return DEFAULT_MI_ESTIMATOR


def checkpoint_estimator_name(path: str | os.PathLike) -> str:
    """Which MI estimator a checkpoint file holds, from its manifest alone (no tensor is read): the critic
    estimator its manifest names, else ``club`` (a CLUB manifest, or the paper's plain state dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return DEFAULT_MI_ESTIMATOR  # not safetensors: a plain state dict, read as a CLUB
    import json

    try:
        manifest = json.loads(metadata.get(MANIFEST_KEY, "{}"))
    except json.JSONDecodeError:
        return DEFAULT_MI_ESTIMATOR  # the loader names the unreadable manifest
    if isinstance(manifest, dict) and manifest.get("format") == CRITIC_FORMAT_NAME:
        name = (manifest.get("hyperparameters") or {}).get("mi_estimator")
        return str(name) if name in MI_ESTIMATORS else "unknown critic"
    return DEFAULT_MI_ESTIMATOR


def load_mi_estimator(path: str | os.PathLike, *, encoders: Mapping[str, Any] | None = None) -> MIEstimator:
    """The estimator in checkpoint ``path``, of whichever kind its manifest says
    (:meth:`CLUB.from_checkpoint <lmms_emi.estimators.club.CLUB.from_checkpoint>` or
    :meth:`CriticMI.from_checkpoint`)."""
    name = checkpoint_estimator_name(path)
    if name == DEFAULT_MI_ESTIMATOR:
        return CLUB.from_checkpoint(path, encoders=encoders)
    if name not in MI_ESTIMATORS:
        raise CheckpointError(f"{path}: its manifest names no known MI estimator")
    return CriticMI.from_checkpoint(path, encoders=encoders)
