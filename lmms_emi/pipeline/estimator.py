"""The estimator policy of a run: a given checkpoint, a registered estimator (by name, or the one registered
for the run's encoders), or one fitted on the run's pooled (query, response) and (query, reference) pairs
(the paper's protocol; by default the fast closed-form fit of :mod:`lmms_emi.estimators.club_fit`,
``--estimator-fit paper`` for the paper's Adam recipe with early stopping on a held-out split).

The MI estimator family is chosen by ``--mi-estimator`` (:data:`~lmms_emi.estimators.families.MI_ESTIMATORS`):
``club`` (the default) as above; ``infonce``, ``nwj`` or ``mine`` are fitted on the same pooled pairs with the
same seed and held-out early stopping (:meth:`CriticMI.fit <lmms_emi.estimators.critic_mi.CriticMI.fit>`), or
loaded from a checkpoint of that estimator (registered estimators are CLUBs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmms_emi import estimator_registry as registry
from lmms_emi.config import EMIConfig, EstimatorChoice
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.encoder_spec import spec_differences
from lmms_emi.errors import EncoderMismatchError, UsageError
from lmms_emi.estimators.club import CLUB, FIT_METHODS
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.estimators.families import (
    DEFAULT_MI_ESTIMATOR,
    MI_ESTIMATORS,
    checkpoint_estimator_name,
    make_mi_estimator,
)

__all__ = [
    "DEFAULT_PATIENCE",
    "FITTED_CHECKPOINT_NAME",
    "EstimatorInfo",
    "EstimatorPolicy",
    "fit_pooled_estimator",
    "pooled_pairs",
    "registered_for",
    "resolve_estimator",
]

FITTED_CHECKPOINT_NAME = "club_fitted.safetensors"
DEFAULT_PATIENCE = 5  # held-out evaluations (every 100 steps) without improvement before a fit stops
_FITTED_NOTE = (
    "estimator fitted on this run's pooled (query, response) and (query, reference) pairs: EMI values "
    "are comparable only within this run; freeze one with `lmms-emi train-estimator` to compare runs"
)


@dataclass(frozen=True)
class EstimatorPolicy:
    """How a run gets its CLUB estimator: the :class:`~lmms_emi.config.EstimatorChoice` (a string is parsed
    into one) and, when one is fitted, ``steps`` / ``seed`` / ``patience`` (held-out evaluations without
    improvement before the fit stops, :meth:`CLUB.fit <lmms_emi.estimators.club.CLUB.fit>`; None trains
    exactly ``steps`` steps, the paper's recipe) and ``fit_method`` ("fast": closed-form start and a short
    full-batch refinement; "paper": AdamW on mini-batches). ``progress`` also shows a download's progress.
    ``mi_estimator``: the MI estimator family (``club``, ``infonce``, ``nwj`` or ``mine``); ``fit_method``
    concerns a CLUB only."""

    choice: EstimatorChoice = field(default_factory=EstimatorChoice)
    steps: int = 5000
    seed: int = 0
    progress: bool = True
    patience: int | None = DEFAULT_PATIENCE
    fit_method: str = "fast"
    mi_estimator: str = DEFAULT_MI_ESTIMATOR

    def __post_init__(self) -> None:
        if not isinstance(self.choice, EstimatorChoice):
            object.__setattr__(self, "choice", EstimatorChoice.parse(self.choice))
        if self.steps < 1:
            raise UsageError(f"the estimator needs at least 1 training step, got {self.steps}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"the estimator's early-stopping patience must be >= 1, got {self.patience}")
        if self.fit_method not in FIT_METHODS:
            raise UsageError(f"the estimator fit must be one of {FIT_METHODS}, got {self.fit_method!r}")
        if self.mi_estimator not in MI_ESTIMATORS:
            raise UsageError(
                f"--mi-estimator must be one of {', '.join(MI_ESTIMATORS)}, got {self.mi_estimator!r}"
            )

    @classmethod
    def from_config(cls, config: EMIConfig) -> EstimatorPolicy:
        """The policy of a run's configuration (``estimator_patience`` 0: no early stopping)."""
        return cls(
            config.estimator,
            steps=config.estimator_steps,
            seed=config.seed,
            progress=config.progress,
            patience=config.estimator_patience or None,
            fit_method=config.estimator_fit,
            mi_estimator=config.mi_estimator,
        )

    def check(self, encoder_spec: Mapping[str, Any] | None) -> None:
        """Fail early (before any embedding) when the chosen estimator is unusable or was trained on other
        encoders than ``encoder_spec`` (the estimator is loaded and checked). With ``encoder_spec`` None (the
        encoders are not known yet) only what needs no loading: a named file exists; a registered estimator
        is found on this machine or downloaded (its sha256 verified)."""
        if encoder_spec is not None:
            fixed_estimator(self, encoder_spec)
        elif self.choice.kind == "registered" and self.mi_estimator != DEFAULT_MI_ESTIMATOR:
            _refuse_registered(self)
        elif self.choice.kind == "registered":
            registry.resolve(str(self.choice.name), progress=self.progress)
        elif self.choice.kind == "file":
            path = self.choice.path
            if path is None or not path.is_file():
                raise UsageError(f"--estimator {self.choice}: no such file")


@dataclass(frozen=True)
class EstimatorInfo:
    """Where the CLUB estimator came from and how far its values can be compared.

    ``source``: "checkpoint" (a path given), "registry" (a registered estimator: named, or the one registered
    for the run's encoders) or "fitted" (fitted on this run's
    pooled pairs). ``comparability``: "global" — comparable with every run using the same checkpoint and
    encoders; "run" — comparable only within this run. ``name``: the registered name of the checkpoint file
    (also when given by path: matched by hash); ``sha256``: the checkpoint file's sha256 (for a fitted one,
    set once the report writer has saved it). Two runs' EMI values are comparable when their ``sha256`` and
    ``encoders`` agree. ``mi_estimator``: the MI estimator family (``club``, ``infonce``, ``nwj``, ``mine``).
    """

    source: str
    path: str | None
    comparability: str
    encoders: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    note: str = ""
    name: str | None = None
    sha256: str | None = None
    mi_estimator: str = DEFAULT_MI_ESTIMATOR

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    patience: int | None = DEFAULT_PATIENCE,
    method: str = "fast",
    mi_estimator: str = DEFAULT_MI_ESTIMATOR,
) -> CLUB | CriticMI:
    """Fit one CLUB on :func:`pooled_pairs` of all tasks with :meth:`CLUB.fit`'s ``method`` ("fast" or
    "paper"; ``patience``: early stopping on a held-out split, at most ``steps`` steps; None: exactly
    ``steps`` steps, the paper's recipe). Another ``mi_estimator`` (``infonce``, ``nwj``, ``mine``) is fitted
    on the same pairs with the same ``seed``, ``steps`` and ``patience`` (``method`` and ``hidden_size``
    concern a CLUB)."""
    x, y = pooled_pairs(task_embeddings)
    if mi_estimator != DEFAULT_MI_ESTIMATOR:
        critic = make_mi_estimator(mi_estimator, x.shape[1], y.shape[1])
        return critic.fit(x, y, steps=steps, seed=seed, progress=progress, patience=patience)
    club = CLUB(x_dim=x.shape[1], y_dim=y.shape[1], hidden_size=hidden_size)
    return club.fit(x, y, method=method, steps=steps, seed=seed, progress=progress, patience=patience)


def registered_for(encoder_spec: Mapping[str, Any]) -> registry.RegistryEntry | None:
    """The first registered estimator trained on exactly ``encoder_spec``, if any."""
    spec = dict(encoder_spec)
    return next(
        (e for e in registry.load_registry().values() if not spec_differences(e.encoder_spec(), spec)),
        None,
    )


def _registered(
    entry: registry.RegistryEntry, spec: dict[str, Any], *, progress: bool, default: bool
) -> tuple[CLUB, EstimatorInfo]:
    """Load the registered estimator ``entry`` (downloaded into the cache if needed) for ``spec``."""
    problems = spec_differences(entry.encoder_spec(), spec, expected_label="checkpoint has")
    if problems:
        raise EncoderMismatchError(
            f"registered estimator {entry.name!r} was trained on other encoders: " + "; ".join(problems)
        )
    path = registry.resolve(entry.name, progress=progress)
    club = CLUB.from_checkpoint(path)
    manifest = _manifest_dict(club)
    if manifest is not None and spec_differences(manifest["encoders"], spec, expected_label="checkpoint has"):
        raise EncoderMismatchError(
            f"{path} (registered estimator {entry.name!r}) was trained on other encoders: "
            + "; ".join(spec_differences(manifest["encoders"], spec, expected_label="checkpoint has"))
        )
    why = "the registered estimator of these encoders" if default else "registered estimator"
    note = f"{why} {entry.name} ({entry.trained_on or entry.source})"
    info = EstimatorInfo("registry", str(path), "global", spec, manifest, note, entry.name, entry.sha256)
    return club, info


def _file_identity(path: Path) -> tuple[str | None, str]:
    """(registered name or None, sha256) of a checkpoint file."""
    digest = registry.file_sha256(path)
    entry = registry.entry_for_sha256(digest)
    return (entry.name if entry else None), digest


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
    club = fit_pooled_estimator(
        pooled,
        seed=policy.seed,
        steps=policy.steps,
        progress=policy.progress,
        patience=policy.patience,
        method=policy.fit_method,
        mi_estimator=policy.mi_estimator,
    )
    manifest = asdict(club.make_manifest(spec))
    return club, EstimatorInfo(
        "fitted", None, "run", spec, manifest, _FITTED_NOTE, mi_estimator=policy.mi_estimator
    )


def fixed_estimator(
    policy: EstimatorPolicy, encoder_spec: Mapping[str, Any]
) -> tuple[CLUB, EstimatorInfo] | None:
    """The estimator when it needs no training (a named checkpoint or registered estimator, or by default the
    registered one for these encoders, downloaded if needed), loaded once; None when the policy fits one."""
    spec = dict(encoder_spec)
    choice = policy.choice
    if policy.mi_estimator != DEFAULT_MI_ESTIMATOR:
        return _fixed_critic(policy, spec)
    if choice.path is not None and choice.path.is_file():
        held = checkpoint_estimator_name(choice.path)
        if held != DEFAULT_MI_ESTIMATOR:
            raise UsageError(
                f"--estimator {choice}: the file holds a {held} estimator, not a CLUB; "
                f"add --mi-estimator {held}"
            )
    if choice.kind == "registered":
        entry = registry.registry_entry(str(choice.name))
        return _registered(entry, spec, progress=policy.progress, default=False)
    if choice.path is not None:
        club = CLUB.from_checkpoint(choice.path, encoders=spec)
        manifest = _manifest_dict(club)
        note = (
            "" if manifest else "plain state dict without manifest: assumed trained on the paper's encoders"
        )
        name, digest = _file_identity(choice.path)
        info = EstimatorInfo("checkpoint", str(choice.value), "global", spec, manifest, note, name, digest)
        return club, info
    if choice.kind == "default":
        entry = registered_for(spec)
        if entry is not None:
            return _registered(entry, spec, progress=policy.progress, default=True)
    return None


def _refuse_registered(policy: EstimatorPolicy) -> None:
    raise UsageError(
        f"--estimator {policy.choice}: registered estimators are CLUBs; --mi-estimator {policy.mi_estimator} "
        f"needs --estimator fit (the default) or a checkpoint of a {policy.mi_estimator} estimator"
    )


def _fixed_critic(policy: EstimatorPolicy, spec: dict[str, Any]) -> tuple[CriticMI, EstimatorInfo] | None:
    """A critic estimator's checkpoint (``--estimator FILE``), checked to hold ``policy.mi_estimator`` and
    trained on ``spec``; None when it is fitted on the run (the default: no critic is registered)."""
    choice = policy.choice
    if choice.kind == "registered":
        _refuse_registered(policy)
    if choice.path is None:
        return None
    if not choice.path.is_file():
        raise UsageError(f"--estimator {choice}: no such file")
    held = checkpoint_estimator_name(choice.path)
    if held != policy.mi_estimator:
        raise UsageError(
            f"--estimator {choice}: the file holds a {held} estimator, "
            f"but --mi-estimator is {policy.mi_estimator}"
        )
    critic = CriticMI.from_checkpoint(choice.path, encoders=spec)
    manifest = asdict(critic.manifest_) if critic.manifest_ is not None else None
    name, digest = _file_identity(choice.path)
    info = EstimatorInfo(
        "checkpoint", str(choice.value), "global", spec, manifest, "", name, digest, policy.mi_estimator
    )
    return critic, info
