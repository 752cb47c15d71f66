"""The estimator policy of a run: a given checkpoint, a shipped one that matches the encoders, or one fitted
on the run's pooled (query, response) and (query, reference) pairs (the paper's protocol)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import CheckpointError, UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.paths import estimator_ckpt_dirs

__all__ = [
    "ESTIMATOR_SUFFIXES",
    "FITTED_CHECKPOINT_NAME",
    "EstimatorInfo",
    "EstimatorPolicy",
    "find_default_checkpoint",
    "fit_pooled_estimator",
    "pooled_pairs",
    "resolve_estimator",
]

ESTIMATOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FITTED_CHECKPOINT_NAME = "club_fitted.safetensors"
FIT = "fit"
_FITTED_NOTE = (
    "estimator fitted on this run's pooled (query, response) and (query, reference) pairs: EMI values "
    "are comparable only within this run; freeze one with `lmms-emi train-estimator` to compare runs"
)


@dataclass(frozen=True)
class EstimatorPolicy:
    """How a run gets its CLUB estimator.

    ``estimator``: a checkpoint path; ``"fit"`` to fit one on the run; None for a shipped checkpoint trained
    on the run's encoders, else fit one. ``steps`` / ``seed`` / ``progress`` apply when one is fitted.
    """

    estimator: str | None = None
    steps: int = 5000
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UsageError(f"the estimator needs at least 1 training step, got {self.steps}")

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint path, when the policy names one."""
        return None if self.estimator in (None, FIT) else Path(str(self.estimator))

    def check(self, encoder_spec: Mapping[str, Any] | None) -> None:
        """Fail early (before any embedding) when a named checkpoint is unusable or was trained on other
        encoders than ``encoder_spec`` (None: the encoders are not known yet, only the file is checked)."""
        if self.checkpoint is not None:
            CLUB.from_checkpoint(
                self.checkpoint, encoders=None if encoder_spec is None else dict(encoder_spec)
            )


@dataclass(frozen=True)
class EstimatorInfo:
    """Where the CLUB estimator came from and how far its values can be compared.

    ``source``: "checkpoint" (a path given), "default" (shipped in ``estimator_ckpt/``) or "fitted" (fitted
    on this run's pooled pairs). ``comparability``: "global" — comparable with every run using the same
    checkpoint and encoders; "run" — comparable only within this run.
    """

    source: str
    path: str | None
    comparability: str
    encoders: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_default_checkpoint(encoder_spec: Mapping[str, Any]) -> tuple[CLUB, Path] | None:
    """The first shipped checkpoint whose manifest matches ``encoder_spec`` (files in name order, safetensors
    first); (CLUB, path) or None."""
    for folder in estimator_ckpt_dirs():
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix in ESTIMATOR_SUFFIXES),
            key=lambda p: (p.suffix != ".safetensors", p.name),
        )
        for path in files:
            try:
                return CLUB.from_checkpoint(path, encoders=dict(encoder_spec)), path
            except CheckpointError:
                continue  # another encoder pair, or not ours
    return None


def pooled_pairs(task_embeddings: Mapping[str, TaskEmbeddings]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's estimator training set: (z_x, z_ŷ) and (z_x, z_y) pairs of all tasks, concatenated in
    task order."""
    xs, ys = [], []
    for task, emb in task_embeddings.items():
        try:
            query = emb.query
        except ValueError as exc:
            raise ValueError(f"task {task!r}: {exc}") from None
        for z in (emb.z_model, emb.z_ref):
            if z is not None:
                xs.append(query)
                ys.append(torch.nn.functional.normalize(torch.as_tensor(z, dtype=torch.float32), dim=-1))
    if not xs:
        raise ValueError("no task has responses or references: nothing to fit the estimator on")
    return torch.cat(xs), torch.cat(ys)


def fit_pooled_estimator(
    task_embeddings: Mapping[str, TaskEmbeddings],
    *,
    seed: int = 0,
    steps: int = 5000,
    hidden_size: int = 500,
    progress: bool = True,
) -> CLUB:
    """Fit one CLUB on :func:`pooled_pairs` of all tasks."""
    x, y = pooled_pairs(task_embeddings)
    club = CLUB(x_dim=x.shape[1], y_dim=y.shape[1], hidden_size=hidden_size)
    return club.fit(x, y, steps=steps, seed=seed, progress=progress)


def _manifest_dict(club: CLUB) -> dict[str, Any] | None:
    return asdict(club.manifest_) if club.manifest_ is not None else None


def resolve_estimator(
    policy: EstimatorPolicy,
    encoder_spec: Mapping[str, Any],
    pooled: Mapping[str, TaskEmbeddings],
) -> tuple[CLUB, EstimatorInfo]:
    """The run's CLUB estimator and where it came from (see :class:`EstimatorPolicy`).

    A checkpoint's manifest is checked against ``encoder_spec``
    (:class:`~lmms_emi.errors.EncoderMismatchError` on a mismatch). A fitted estimator is not saved here:
    the report writer saves it beside the reports (``club_fitted.safetensors``).
    """
    fixed = fixed_estimator(policy, encoder_spec)
    if fixed is not None:
        return fixed
    spec = dict(encoder_spec)
    club = fit_pooled_estimator(pooled, seed=policy.seed, steps=policy.steps, progress=policy.progress)
    manifest = asdict(club.make_manifest(spec))
    return club, EstimatorInfo("fitted", None, "run", spec, manifest, _FITTED_NOTE)


def fixed_estimator(
    policy: EstimatorPolicy, encoder_spec: Mapping[str, Any]
) -> tuple[CLUB, EstimatorInfo] | None:
    """The estimator when it needs no training (a named checkpoint, or a shipped one for these encoders),
    loaded once; None when the policy fits one."""
    spec = dict(encoder_spec)
    if policy.checkpoint is not None:
        club = CLUB.from_checkpoint(policy.checkpoint, encoders=spec)
        manifest = _manifest_dict(club)
        note = (
            "" if manifest else "plain state dict without manifest: assumed trained on the paper's encoders"
        )
        return club, EstimatorInfo("checkpoint", str(policy.checkpoint), "global", spec, manifest, note)
    if policy.estimator is None:
        found = find_default_checkpoint(spec)
        if found is not None:
            club, path = found
            return club, EstimatorInfo(
                "default", str(path), "global", spec, _manifest_dict(club), "shipped estimator"
            )
    return None
