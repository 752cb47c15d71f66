"""The critic-based MI estimators InfoNCE, NWJ and MINE: a critic network (:mod:`.critics`) trained to
maximise a variational lower bound (:mod:`.mi_bounds`), the bound of the fitted critic being the estimate.

:class:`CriticMI` is the thin stateful part; the math is in :mod:`.mi_bounds` (the bounds as functions of a
score matrix, torch-mist's split of bound and critic). It follows the CLUB's conventions
(:class:`~lmms_emi.estimators.club.CLUB`): ``fit`` returns the estimator, learned state ends in ``_``,
estimating before ``fit`` / loading raises :class:`~lmms_emi.errors.NotFittedError`; ``fit`` takes the same
seed and held-out early stopping (a seeded split, the held-out bound checked every ``check_every`` steps,
the best weights restored); checkpoints are the same safetensors + manifest + sha256 format
(:mod:`.checkpoint`, manifest format :data:`~lmms_emi.estimators.checkpoint.CRITIC_FORMAT_NAME`).

Training: Adam on mini-batches of ``batch_size`` distinct rows (drawn without replacement from a generator
seeded by ``seed``), the loss the negative batch bound (InfoNCE, NWJ) or MINE's moving-average surrogate.
The estimate on N rows evaluates the N×N scores in blocks of rows (never N×N×d; a separable critic costs
O(N·d·hidden + N²·k)).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmms_emi.errors import CheckpointError, NotFittedError
from lmms_emi.estimators import mi_bounds
from lmms_emi.estimators.checkpoint import (
    CRITIC_FORMAT_NAME,
    CheckpointManifest,
    check_encoders,
    check_state,
    fingerprint,
    manifest_for,
    probe_batch,
    read_checkpoint,
    write_checkpoint,
)
from lmms_emi.estimators.critics import CRITICS, make_critic
from lmms_emi.estimators.training import (
    FitInfo,
    check_fit_arguments,
    check_pairs,
    reset_linear_layers,
    train_on_pairs,
)

__all__ = ["SCORE_BUDGET", "CriticFitInfo", "CriticMI"]

#: Scores per block of rows when an estimate evaluates the N×N matrix (float64 working memory ~128 MB).
SCORE_BUDGET = 1 << 24


class CriticFitInfo(FitInfo):
    """How a critic estimator's fit went (:class:`~lmms_emi.estimators.training.FitInfo`)."""


class CriticMI(nn.Module):
    """A critic-based MI estimator: ``bound`` "infonce", "nwj" or "mine" over a ``critic`` ("separable":
    g(x)ᵀh(y), or "concat": MLP([x; y])) with ``hidden_size`` hidden units and (separable) ``embed_dim``.

    A critic that ignores its inputs (all weights 0: every score 0) gives InfoNCE = 0 − log N + log N = 0,
    NWJ = 0 − e⁻¹ and DV = 0:

    >>> est = CriticMI(2, 2, bound="infonce", hidden_size=4, embed_dim=2)
    >>> with torch.no_grad():
    ...     _ = [p.zero_() for p in est.parameters()]
    >>> _ = est.load_state_dict(est.state_dict())  # now fitted
    >>> x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 1.0]])
    >>> est.mutual_information(x, x)
    0.0
    """

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        bound: str = "infonce",
        critic: str = "separable",
        hidden_size: int = 256,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        if bound not in mi_bounds.BOUNDS:
            raise ValueError(f"unknown MI bound {bound!r}: one of {', '.join(mi_bounds.BOUNDS)}")
        if min(x_dim, y_dim, hidden_size, embed_dim) < 1:
            raise ValueError(
                f"bad critic sizes x_dim={x_dim}, y_dim={y_dim}, hidden={hidden_size}, k={embed_dim}"
            )
        self.x_dim, self.y_dim, self.hidden_size, self.embed_dim = x_dim, y_dim, hidden_size, embed_dim
        self.bound, self.critic_kind = bound, critic
        self.critic = make_critic(critic, x_dim, y_dim, hidden_size, embed_dim)
        self.manifest_: CheckpointManifest | None = None
        self.fit_info_: CriticFitInfo | None = None
        self._fitted = False

    @property
    def name(self) -> str:
        """The estimator's registered name (:data:`~lmms_emi.estimators.families.MI_ESTIMATORS`)."""
        return self.bound

    # -- fitted state (scikit-learn's protocol) -----------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return self._fitted

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._fitted = True
        return result

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(
                f"this {self.bound} estimator is not fitted: call fit() or from_checkpoint()"
            )

    def _check_pairs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        name = f"{self.bound} estimator"
        return check_pairs(x, y, x_dim=self.x_dim, y_dim=self.y_dim, name=name, device=device)

    # -- estimates ---------------------------------------------------------------------------------
    def _blocks(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, scores of a block of rows against all of y), under no_grad, in eval mode."""
        rows = max(1, SCORE_BUDGET // max(1, y.shape[0]))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], rows):
                    yield start, self.critic.scores(x[start : start + rows], y)
        finally:
            self.train(was_training)

    def scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The full (N, N) score matrix S_ij = f(x_i, y_j) of paired rows, float32 (for a task's bootstrap:
        :func:`~lmms_emi.estimators.mi_bounds.weighted_bounds`)."""
        self._check_fitted()
        x, y = self._check_pairs(x, y)
        return torch.cat([block for _, block in self._blocks(x, y)])

    def _row_terms(self, x: torch.Tensor, y: torch.Tensor) -> mi_bounds.RowTerms:
        self._check_fitted()
        x, y = self._check_pairs(x, y)
        return mi_bounds.RowTerms.cat([mi_bounds.row_terms(b, first_row=i) for i, b in self._blocks(x, y)])

    def mutual_information(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The fitted critic's bound on paired rows (x_i, y_i), nats (:func:`mi_bounds.bound_from_terms`)."""
        return mi_bounds.bound_from_terms(self.bound, self._row_terms(x, y))

    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Same as :meth:`mutual_information`."""
        return self.mutual_information(x, y)

    def sample_contributions(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample terms s_i whose mean is the estimate (float64, (n,)): InfoNCE S_ii − lse_i + log N;
        NWJ S_ii − e⁻¹·mean_{j≠i} e^{S_ij}; DV S_ii − log mean_{i≠j} e^{S_ij} (its log term is one number for
        the whole sample, so only the positive scores vary)."""
        terms = self._row_terms(x, y)
        n = terms.n
        if self.bound == "infonce":
            return terms.positive - terms.lse_all + math.log(n)
        if self.bound == "nwj":
            return terms.positive - torch.exp(terms.lse_off - math.log(n - 1) - 1.0)
        log_mean_off = torch.logsumexp(terms.lse_off, dim=0) - math.log(n * (n - 1))
        return terms.positive - log_mean_off

    # -- training ----------------------------------------------------------------------------------
    def reset_parameters(self, seed: int) -> None:
        """Seeded default init of the critic's Linear layers (:func:`~.training.reset_linear_layers`);
        unfitted afterwards."""
        self._fitted = False
        reset_linear_layers(self, seed)

    def _heldout_bound(self, x: torch.Tensor, y: torch.Tensor) -> float:
        terms = mi_bounds.RowTerms.cat([mi_bounds.row_terms(b, first_row=i) for i, b in self._blocks(x, y)])
        return mi_bounds.bound_from_terms(self.bound, terms)

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        steps: int = 5000,
        batch_size: int = 256,
        lr: float = 5e-4,
        seed: int = 0,
        patience: int | None = None,
        check_every: int = 100,
        validation_fraction: float = 0.1,
        min_improvement: float = 1e-3,
        mine_rate: float = 0.01,
        progress: bool = True,
    ) -> CriticMI:
        """Train the critic to maximise the bound on paired rows (x_i, y_i).

        Deterministic for a seed: parameters are re-initialised from ``seed`` and the held-out split and the
        batches are drawn from a generator seeded by it. ``patience=None``: exactly ``steps`` steps on all
        pairs. With ``patience`` (:mod:`~lmms_emi.estimators.training`): the first
        ``max(2, round(validation_fraction · n))`` rows of a seeded permutation are held out, the held-out
        bound is evaluated every ``check_every`` steps and at the last one, training stops after ``patience``
        evaluations without an improvement above ``min_improvement`` nats, and the weights of the best
        evaluation are restored (the CLUB's rule, on the bound instead of the log-likelihood). ``mine_rate``:
        MINE's moving-average rate. A loss that turns NaN or inf stops the fit (recorded as
        ``diverged_at_step``) with the best held-out weights; without any, it is a ValueError.
        """
        x, y = self._check_pairs(x, y)
        check_fit_arguments(steps, batch_size, patience, check_every, validation_fraction, min_batch_size=2)
        self.reset_parameters(seed)
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        hyper: dict[str, Any] = {
            "mi_estimator": self.bound,
            "critic": self.critic_kind,
            "embed_dim": self.embed_dim,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "optimizer": "Adam",
        }
        if self.bound == "mine":
            hyper["mine_moving_average_rate"] = mine_rate
        log_running: torch.Tensor | None = None

        def step(x_fit: torch.Tensor, y_fit: torch.Tensor) -> float | None:  # distinct rows; None: NaN/inf
            nonlocal log_running
            idx = torch.randperm(x_fit.shape[0], generator=gen)[:batch_size].to(x_fit.device)
            s = self.critic.scores(x_fit[idx], y_fit[idx])
            if self.bound == "mine":
                loss, log_running = mi_bounds.mine_surrogate_loss(s, log_running, mine_rate)
                shown = -float(mi_bounds.training_bound("mine", s.detach()))  # the batch bound, for display
            else:
                loss = -mi_bounds.training_bound(self.bound, s)
                shown = float(loss.detach())
            if not math.isfinite(float(loss.detach())) or not math.isfinite(shown):
                return None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return shown

        self.train()
        run = train_on_pairs(  # a bound needs 2 held-out rows
            self, x, y, step, self._heldout_bound,
            gen=gen, steps=steps, patience=patience, check_every=check_every,
            validation_fraction=validation_fraction, min_improvement=min_improvement,
            min_heldout_rows=2, what=f"a {self.bound} estimator", score_name="bound",
            desc=f"{self.bound} fit", progress=progress, postfix=lambda loss: {"bound": f"{-loss:.4f}"},
        )  # fmt: skip
        if run.diverged_at_step is not None:
            hyper["diverged_at_step"] = run.diverged_at_step
            if not run.restored:
                raise ValueError(
                    f"the {self.bound} critic's loss became NaN or inf at step {run.diverged_at_step} before "
                    "any held-out check: try fewer steps, a smaller learning rate, or another estimator"
                )
        if run.early_stopping is not None:
            hyper["early_stopping"] = run.early_stopping
        info = CriticFitInfo(run.steps_run, run.final_loss, run.stopped_early, fingerprint(x, y), hyper)
        self.eval()
        self._fitted = True
        self.manifest_ = None
        self.fit_info_ = info
        return self

    # -- checkpoints -------------------------------------------------------------------------------
    def _architecture(self) -> dict[str, Any]:
        return {"mi_estimator": self.bound, "critic": self.critic_kind, "embed_dim": self.embed_dim}

    def make_manifest(self, encoders: Mapping[str, Any]) -> CheckpointManifest:
        """A manifest for this estimator: sizes, architecture, the encoder spec and, if fitted, the fit."""
        return manifest_for(self, encoders, architecture=self._architecture(), format=CRITIC_FORMAT_NAME)

    def save(self, path: str | os.PathLike, manifest: CheckpointManifest) -> Path:
        """Write the state dict and ``manifest`` (its checksum set) as one safetensors file, atomically."""
        same = (manifest.x_dim, manifest.y_dim, manifest.hidden_size) == (
            self.x_dim,
            self.y_dim,
            self.hidden_size,
        )
        arch = {k: manifest.hyperparameters.get(k) for k in self._architecture()}
        if not same or arch != self._architecture() or manifest.format != CRITIC_FORMAT_NAME:
            raise ValueError("the manifest does not describe this estimator (use make_manifest)")
        path = Path(path)
        self.manifest_ = write_checkpoint(path, self.state_dict(), manifest)
        return path

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        encoders: Mapping[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> CriticMI:
        """Load a checkpoint written by :meth:`save`: its checksum verified, its architecture from the
        manifest, its scores on a seeded probe batch finite. :class:`~lmms_emi.errors.CheckpointError` naming
        the file (and tensor) otherwise; :class:`~lmms_emi.errors.EncoderMismatchError` when ``encoders``
        differs from the manifest's."""
        path = Path(path)
        state, manifest = read_checkpoint(path)
        if manifest is None or manifest.format != CRITIC_FORMAT_NAME:
            raise CheckpointError(f"{path} is not a critic MI estimator (InfoNCE, NWJ or MINE) checkpoint")
        hyper = manifest.hyperparameters
        bound, critic, embed_dim = hyper.get("mi_estimator"), hyper.get("critic"), hyper.get("embed_dim")
        if bound not in mi_bounds.BOUNDS or critic not in CRITICS or not isinstance(embed_dim, int):
            raise CheckpointError(
                f"{path}: its manifest names no known critic estimator (mi_estimator={bound!r}, "
                f"critic={critic!r}, embed_dim={embed_dim!r})"
            )
        est = cls(manifest.x_dim, manifest.y_dim, bound=bound, critic=critic,
                  hidden_size=manifest.hidden_size, embed_dim=embed_dim)  # fmt: skip
        check_state(path, state, est.state_dict(), exact=True)
        est.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
        est.eval()
        with torch.no_grad():
            probe = probe_batch(max(est.x_dim, est.y_dim))
            scores = est.critic.scores(probe[:, : est.x_dim], probe[:, : est.y_dim])
        if not bool(torch.isfinite(scores).all()):
            raise CheckpointError(
                f"{path}: the critic's scores are NaN or inf on unit-norm inputs (corrupt weights)"
            )
        est.manifest_ = manifest
        est.source_ = str(path)
        if encoders is not None:
            check_encoders(path, manifest, encoders)
        return est.to(map_location)
