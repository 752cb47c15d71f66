"""CLUB, the estimator: a Gaussian variational q(y|x) fitted by maximum likelihood (Cheng et al., ICML 2020).

:class:`CLUB` is the ``nn.Module`` q(y|x) = N(μ(x), diag σ²(x)) and its training loop :meth:`CLUB.fit`; its
estimate :meth:`CLUB.mutual_information` is the closed form of :mod:`lmms_emi.estimators.club_form` on the
conditional parameters μ(x_i), log σ²(x_i):

    Î(X; Y) = 1/N Σ_i log q(y_i|x_i) − 1/N² Σ_i Σ_j log q(y_j|x_i)      (O(N·d), see club_form).

Checkpoints (:meth:`CLUB.save`, :meth:`CLUB.from_checkpoint`) use the format of
:mod:`lmms_emi.estimators.checkpoint`.

:class:`CLUB` follows scikit-learn's conventions: ``fit`` returns the estimator, learned state ends in ``_``
(``fit_info_``, ``manifest_``), and estimating before ``fit`` / loading a checkpoint raises
:class:`~lmms_emi.errors.NotFittedError`.

The module layout (``p_mu``, ``p_logvar``) matches the paper's estimator, so its state dict loads directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmms_emi.errors import CheckpointError, EncoderMismatchError, NotFittedError
from lmms_emi.estimators import club_form
from lmms_emi.estimators.checkpoint import (
    CheckpointManifest,
    check_encoders,
    check_probe_outputs,
    check_state,
    fingerprint,
    manifest_for,
    probe_batch,
    read_checkpoint,
    write_checkpoint,
)
from lmms_emi.estimators.club_fit import fast_fit
from lmms_emi.estimators.club_form import club_mutual_information
from lmms_emi.estimators.training import (
    FitInfo,
    check_fit_arguments,
    check_pairs,
    reset_linear_layers,
    train_on_pairs,
)

FIT_METHODS = ("fast", "paper")

__all__ = [
    "CLUB",
    "CheckpointError",
    "EncoderMismatchError",
    "FitInfo",
    "NotFittedError",
]


def _mlp(x_dim: int, hidden: int, y_dim: int, *, bounded: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, y_dim)]
    if bounded:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class CLUB(nn.Module):
    """Gaussian variational q(y|x) with mean ``p_mu(x)`` and log-variance ``p_logvar(x)`` ∈ (−1, 1).

    ``p_mu = Linear(x_dim, h/2) → Tanh → Linear(h/2, y_dim)``; ``p_logvar`` is the same plus a final Tanh.

    Fitted (scikit-learn's sense) after :meth:`fit`, :meth:`from_checkpoint` or :meth:`load_state_dict`;
    before that, :meth:`conditional_params` and :meth:`mutual_information` raise ``NotFittedError``.
    Learned state: ``fit_info_`` (set by ``fit``) and ``manifest_`` (set by ``save`` / ``from_checkpoint``,
    reset by ``fit``); both are None when unknown.

    A q(y|x) that ignores x (all weights 0: μ = 0, σ² = 1) has log q(y_j|x_i) = −½|y_j|² for every i, so the
    positive and negative means are equal and Î = 0:

    >>> club = CLUB(2, 2, 4)
    >>> with torch.no_grad():
    ...     _ = [p.zero_() for p in club.parameters()]
    >>> _ = club.load_state_dict(club.state_dict())  # now fitted
    >>> x, y = torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> club.mutual_information(x, y)
    0.0
    """

    def __init__(self, x_dim: int = 768, y_dim: int = 768, hidden_size: int = 500) -> None:
        super().__init__()
        if min(x_dim, y_dim) < 1 or hidden_size < 2:
            raise ValueError(f"bad CLUB sizes x_dim={x_dim}, y_dim={y_dim}, hidden_size={hidden_size}")
        self.x_dim, self.y_dim, self.hidden_size = x_dim, y_dim, hidden_size
        self.p_mu = _mlp(x_dim, hidden_size // 2, y_dim, bounded=False)
        self.p_logvar = _mlp(x_dim, hidden_size // 2, y_dim, bounded=True)
        self.manifest_: CheckpointManifest | None = None
        self.fit_info_: FitInfo | None = None
        self._fitted = False

    # -- fitted state (scikit-learn's protocol) -----------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        """True once fitted, loaded from a checkpoint, or given a state dict."""
        return self._fitted

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(
                f"this CLUB({self.x_dim}, {self.y_dim}, {self.hidden_size}) is not fitted: call fit() or "
                "load a checkpoint (CLUB.from_checkpoint / load_state_dict) before estimating"
            )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, marking the estimator fitted when no weight is missing."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if not result.missing_keys:
            self._fitted = True
        return result

    # -- the model ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional mean and log-variance of q(y|x)."""
        return self.p_mu(x), self.p_logvar(x)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training objective: mean_i Σ_d [−(y_id − μ_id)²/σ²_id − log σ²_id] (2× the Gaussian log-density
        without its constant)."""
        mu, logvar = self(x)
        return (-((mu - y) ** 2) * torch.exp(-logvar) - logvar).sum(dim=1).mean()

    def _check_pairs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        return check_pairs(x, y, x_dim=self.x_dim, y_dim=self.y_dim, name="CLUB", device=device)

    @torch.no_grad()
    def conditional_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ(x), log σ²(x) for all rows, computed in chunks under no_grad."""
        self._check_fitted()
        device = next(self.parameters()).device
        x = torch.as_tensor(x).to(device, torch.float32)
        mu = torch.empty(x.shape[0], self.y_dim, device=device)  # filled chunk by chunk: no concatenation
        logvar = torch.empty_like(mu)
        chunk = club_form.CHUNK_ROWS
        for i in range(0, x.shape[0], chunk):
            mu[i : i + chunk], logvar[i : i + chunk] = self(x[i : i + chunk])
        return mu, logvar

    def mutual_information(self, x: torch.Tensor, y: torch.Tensor, *, leave_one_out: bool = False) -> float:
        """CLUB estimate of I(X; Y) in nats from paired rows (x_i, y_i); O(N·d)
        (:func:`~lmms_emi.estimators.club_form.club_mutual_information` of μ(x), log σ²(x) and y):
        Î = 1/N Σ_i log q(y_i|x_i) − 1/N² Σ_i Σ_j log q(y_j|x_i)."""
        self._check_fitted()
        x, y = self._check_pairs(x, y)
        was_training = self.training
        self.eval()
        try:
            mu, logvar = self.conditional_params(x)
        finally:
            self.train(was_training)
        return club_mutual_information(mu, logvar, y, leave_one_out=leave_one_out)

    # -- training ----------------------------------------------------------------------------------
    def reset_parameters(self, seed: int) -> None:
        """The seeded default init of every Linear layer (:func:`~.training.reset_linear_layers`); the
        estimator is unfitted afterwards."""
        self._fitted = False
        reset_linear_layers(self, seed)

    @torch.no_grad()
    def _heldout_log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self.log_likelihood(x, y))

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        method: str = "paper",
        steps: int = 5000,
        batch_size: int = 1024,
        lr: float = 1e-3,
        seed: int = 0,
        warm_start: bool = False,
        patience: int | None = None,
        check_every: int = 100,
        validation_fraction: float = 0.1,
        min_improvement: float = 1e-3,
        progress: bool = True,
    ) -> CLUB:
        """Fit q(y|x) by maximising the Gaussian log-likelihood: ``method="paper"`` with AdamW on random
        mini-batches (below), ``"fast"`` from a closed-form linear-Gaussian start refined by a few full-batch
        steps (:mod:`~lmms_emi.estimators.club_fit`; it uses ``seed``, ``steps`` as a cap, ``patience``,
        ``validation_fraction`` and ``min_improvement``, and always holds out a split).

        Deterministic for a seed: parameters are re-initialised from ``seed`` (unless ``warm_start``), and the
        held-out split and the batches are drawn from a generator seeded by it.

        ``patience=None`` (the paper's recipe): exactly ``steps`` steps on all pairs. With ``patience`` set
        (early stopping, :mod:`~lmms_emi.estimators.training`): a ``validation_fraction`` of the pairs is held
        out (the first ``round(validation_fraction · n)`` rows of ``torch.randperm(n)`` drawn from the seeded
        generator), its mean :meth:`log_likelihood` is evaluated every ``check_every`` steps and at the last
        one, training stops after ``patience`` evaluations without an improvement above ``min_improvement``
        (absolute, in the objective's units), or at ``steps``; the weights of the best evaluation are
        restored. ``fit_info_.hyperparameters["early_stopping"]`` records the split, the best step and its
        held-out log-likelihood.
        """
        x, y = self._check_pairs(x, y)
        if method not in FIT_METHODS or (method == "fast" and warm_start):
            raise ValueError(f"method must be one of {FIT_METHODS} (fast: no warm_start), got {method!r}")
        check_fit_arguments(steps, batch_size, patience, check_every, validation_fraction)
        if method == "fast":
            return self._fit_fast(x, y, steps, seed, patience, validation_fraction, min_improvement)
        hyper: dict[str, Any] = {
            "method": method,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "optimizer": "AdamW",
        }
        self._fitted = False  # until training completes
        if not warm_start:
            self.reset_parameters(seed)
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr)

        def step(x_fit: torch.Tensor, y_fit: torch.Tensor) -> float:  # a random batch, with replacement
            n = x_fit.shape[0]
            idx = torch.randint(n, (min(batch_size, n),), generator=gen).to(x_fit.device)
            loss = -self.log_likelihood(x_fit[idx], y_fit[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        self.train()
        run = train_on_pairs(
            self, x, y, step, self._heldout_log_likelihood,
            gen=gen, steps=steps, patience=patience, check_every=check_every,
            validation_fraction=validation_fraction, min_improvement=min_improvement,
            what="a CLUB", score_name="log_likelihood", desc="CLUB fit", progress=progress,
            heldout_label="heldout_ll",
        )  # fmt: skip
        if run.early_stopping is not None:
            hyper["early_stopping"] = run.early_stopping
        info = FitInfo(run.steps_run, run.final_loss, run.stopped_early, fingerprint(x, y), hyper)
        return self._fitted_with(info)

    def _fit_fast(self, x, y, steps, seed, patience, validation_fraction, min_improvement) -> CLUB:
        self.reset_parameters(seed)  # the seeded default init of the weights the closed form does not set
        gen = torch.Generator().manual_seed(seed)
        fit = fast_fit(
            self,
            x,
            y,
            gen=gen,
            steps=steps,
            patience=patience,
            validation_fraction=validation_fraction,
            min_improvement=min_improvement,
        )
        hyper = {"method": "fast", "steps": steps, "seed": seed, "fast_fit": fit.hyperparameters}
        return self._fitted_with(
            FitInfo(fit.steps_run, fit.final_loss, fit.stopped_early, fingerprint(x, y), hyper)
        )

    def _fitted_with(self, info: FitInfo) -> CLUB:
        self.eval()
        self._fitted = True
        self.manifest_ = None  # new weights: no saved manifest describes them until save()
        self.fit_info_ = info
        return self

    # -- checkpoints -------------------------------------------------------------------------------
    def make_manifest(self, encoders: Mapping[str, Any]) -> CheckpointManifest:
        """A manifest for this estimator: its sizes, the given encoder spec and, if fitted, the fit data."""
        return manifest_for(self, encoders)

    def save(self, path: str | os.PathLike, manifest: CheckpointManifest) -> Path:
        """Write the state dict and ``manifest`` (its ``tensors_sha256`` set to the state dict's checksum) as
        one safetensors file, atomically (:func:`~lmms_emi.estimators.checkpoint.write_checkpoint`)."""
        sizes = (manifest.x_dim, manifest.y_dim, manifest.hidden_size)
        if sizes != (self.x_dim, self.y_dim, self.hidden_size):
            raise ValueError("manifest sizes do not match this estimator")
        path = Path(path)
        self.manifest_ = write_checkpoint(path, self.state_dict(), manifest)
        return path

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        x_dim: int | None = None,
        y_dim: int | None = None,
        encoders: Mapping[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> CLUB:
        """Load the project's safetensors format (with manifest) or the paper's plain ``torch.save``
        state dict (no manifest; assumed trained on :data:`~lmms_emi.encoder_spec.PAPER_ENCODERS`).

        Raises :class:`CheckpointError` for a missing, corrupt or wrongly shaped file (naming which tensor
        and why), also for one whose outputs on a seeded probe batch of unit vectors are not finite or whose
        |μ(x)| exceeds :data:`~lmms_emi.estimators.checkpoint.MU_NORM_LIMIT`, and
        :class:`EncoderMismatchError` when ``encoders`` differs from what it was trained on.
        """
        path = Path(path)
        state, manifest = read_checkpoint(path)
        club = cls._from_state(path, state, x_dim=x_dim, y_dim=y_dim)
        club.manifest_ = manifest
        club.source_ = str(path)  # names the estimator in errors about its results
        if encoders is not None:
            check_encoders(path, manifest, encoders)
        return club.to(map_location)

    @classmethod
    def _from_state(
        cls, path: Path, state: Mapping[str, torch.Tensor], *, x_dim: int | None, y_dim: int | None
    ) -> CLUB:
        required = [
            f"{net}.{i}.{p}" for net in ("p_mu", "p_logvar") for i in (0, 2) for p in ("weight", "bias")
        ]
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(f"{path} is not a CLUB state dict: missing {', '.join(missing)}")
        bad = [
            k
            for k in required
            if not isinstance(state[k], torch.Tensor) or state[k].ndim != k.count("weight") + 1
        ]
        if bad:
            raise CheckpointError(
                f"{path} is not a CLUB state dict: {', '.join(bad)} have the wrong number of dims"
            )
        half, ckpt_x = state["p_mu.0.weight"].shape
        ckpt_y = state["p_mu.2.weight"].shape[0]
        for name, want in ((" x_dim", (x_dim, ckpt_x)), (" y_dim", (y_dim, ckpt_y))):
            if want[0] is not None and want[0] != want[1]:
                raise CheckpointError(
                    f"{path} has{name}={want[1]} (p_mu.0.weight {tuple(state['p_mu.0.weight'].shape)}, "
                    f"p_mu.2.weight {tuple(state['p_mu.2.weight'].shape)}), but{name}={want[0]} was requested"
                )
        club = cls(ckpt_x, ckpt_y, 2 * half)
        expected = club.state_dict()
        check_state(path, state, expected)
        club.load_state_dict({k: state[k].to(torch.float32) for k in expected})
        club.eval()
        with torch.no_grad():  # what a checksum cannot vouch for: the outputs on a seeded probe batch
            probe = probe_batch(ckpt_x)
            check_probe_outputs(path, club.p_mu(probe), club.p_logvar[:-1](probe))
        return club
