"""The training machinery the estimators' fits share: seeded re-initialisation, the held-out split, the
validation of the fit arguments and the early-stopping loop.

Used by :meth:`CLUB.fit <lmms_emi.estimators.club.CLUB.fit>` (the paper recipe),
:meth:`CriticMI.fit <lmms_emi.estimators.critic_mi.CriticMI.fit>` (InfoNCE, NWJ, MINE) and the fast CLUB
fit (:mod:`.club_fit`, which shares the split and the held-out monitor but not the loop):

- :func:`reset_linear_layers` — every ``nn.Linear`` re-drawn as PyTorch's default init does, from a CPU
  generator seeded by ``seed`` (identical on any device);
- :func:`heldout_split`, :func:`split_pairs` — the seeded held-out split: the first
  ``round(validation_fraction · n)`` rows of ``torch.randperm(n)`` are held out, the rest train;
- :func:`check_pairs`, :func:`check_fit_arguments` — one-line ValueErrors for bad paired rows (every fit
  and estimate), bad ``steps``, ``batch_size`` or early-stopping settings;
- :class:`HeldoutMonitor` — the best held-out score, its step and weights, and the patience count;
- :func:`train_with_early_stopping` — the loop: a caller's step function run ``steps`` times, its losses
  averaged over windows of ``check_every`` steps, the held-out score checked at the end of every window,
  a stop after ``patience`` checks without improvement, a non-finite loss ending the run, a progress bar;
- :func:`train_on_pairs` — a fit on paired rows: the split, the monitor, the loop, the best weights
  restored and the early-stopping record (what ``CLUB.fit`` and ``CriticMI.fit`` run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "FitInfo",
    "HeldoutMonitor",
    "TrainingRun",
    "check_fit_arguments",
    "check_pairs",
    "heldout_split",
    "reset_linear_layers",
    "split_pairs",
    "train_on_pairs",
    "train_with_early_stopping",
]

Pair = tuple[torch.Tensor, torch.Tensor]


class _Stateful(Protocol):
    def state_dict(self) -> Mapping[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any: ...


def reset_linear_layers(module: nn.Module, seed: int) -> None:
    """Re-draw the weight, then the bias, of every ``nn.Linear`` in ``module.modules()`` order from
    U(−b, b), b = 1/√fan_in (PyTorch's default init), with one CPU generator seeded by ``seed``: the same
    values on any device.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> reset_linear_layers(net, 0); first = net[0].weight.clone()
    >>> reset_linear_layers(net, 0); bool((net[0].weight == first).all())
    True
    >>> bool(net[0].weight.abs().max() <= 1 / 4**0.5)
    True
    """
    gen = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            bound = 1.0 / math.sqrt(layer.in_features)
            with torch.no_grad():
                for p in (layer.weight, layer.bias):
                    vals = torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound
                    p.copy_(vals.to(p.device))


def check_pairs(
    x: torch.Tensor, y: torch.Tensor, *, x_dim: int, y_dim: int, name: str, device: torch.device
) -> Pair:
    """Paired rows (x_i, y_i) as float32 on ``device``; a one-line ValueError naming the estimator
    (``name``) unless x is (n, ``x_dim``) and y (n, ``y_dim``), n ≥ 2, all finite.

    >>> cpu = torch.device("cpu")
    >>> check_pairs(torch.ones(3, 2), torch.ones(2, 2), x_dim=2, y_dim=2, name="CLUB", device=cpu)
    Traceback (most recent call last):
    ValueError: x has 3 rows but y has 2: samples must be paired
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be 2-D, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}: samples must be paired")
    if x.shape[1] != x_dim or y.shape[1] != y_dim:
        raise ValueError(
            f"this {name} takes x of dim {x_dim} and y of dim {y_dim}, got {x.shape[1]} and {y.shape[1]}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 paired samples, got {x.shape[0]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x or y contains NaN or inf")
    return x.to(device, torch.float32), y.to(device, torch.float32)


def check_fit_arguments(
    steps: int,
    batch_size: int,
    patience: int | None,
    check_every: int,
    validation_fraction: float,
    *,
    min_batch_size: int = 1,
) -> None:
    """ValueError (one line) unless ``steps`` ≥ 1, ``batch_size`` ≥ ``min_batch_size`` and, with
    ``patience`` set, ``patience`` ≥ 1, ``check_every`` ≥ 1 and 0 < ``validation_fraction`` < 1.

    >>> check_fit_arguments(100, 1, None, 10, 0.1, min_batch_size=2)
    Traceback (most recent call last):
    ValueError: steps must be >= 1 and batch_size >= 2, got 100 and 1
    """
    if steps < 1 or batch_size < min_batch_size:
        raise ValueError(
            f"steps must be >= 1 and batch_size >= {min_batch_size}, got {steps} and {batch_size}"
        )
    if patience is not None and (patience < 1 or check_every < 1 or not 0 < validation_fraction < 1):
        raise ValueError(
            f"early stopping needs patience >= 1, check_every >= 1 and 0 < validation_fraction < 1, got "
            f"{patience}, {check_every} and {validation_fraction}"
        )


def heldout_split(n: int, validation_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """The seeded permutation of ``n`` rows and how many of its first rows are held out:
    ``round(validation_fraction · n)``, at least 1 and at most n − 1.

    >>> order, n_held = heldout_split(10, 0.25, torch.Generator().manual_seed(0))
    >>> sorted(order.tolist()) == list(range(10)), n_held
    (True, 2)
    """
    order = torch.randperm(n, generator=gen)
    return order, min(max(1, round(validation_fraction * n)), n - 1)


def split_pairs(
    x: torch.Tensor,
    y: torch.Tensor,
    validation_fraction: float,
    gen: torch.Generator,
    *,
    min_rows: int = 1,
    what: str = "an estimator",
) -> tuple[Pair, Pair]:
    """((train x, train y), (held-out x, held-out y)) of paired rows, split by :func:`heldout_split` with at
    least ``min_rows`` held-out rows; ValueError naming ``what`` is fitted when fewer than ``min_rows`` rows
    would be left to train on."""
    n = x.shape[0]
    order, n_held = heldout_split(n, validation_fraction, gen)
    order, n_held = order.to(x.device), max(n_held, min_rows)
    if n - n_held < min_rows:
        raise ValueError(
            f"{n} pairs are too few to fit {what} with a held-out split (at least {2 * min_rows})"
        )
    held, train = order[:n_held], order[n_held:]
    return (x[train], y[train]), (x[held], y[held])


class HeldoutMonitor:
    """Early stopping on a held-out score (higher is better): the best score, its step and a copy of the
    weights of ``module`` then, and how many checks in a row brought no improvement above
    ``min_improvement`` (absolute, in the score's units). A NaN or inf score never counts as an improvement.

    >>> net = nn.Linear(1, 1)
    >>> monitor = HeldoutMonitor(net, patience=2, min_improvement=0.1)
    >>> for step, score in enumerate([1.0, 1.05, 2.0, 2.1, float("nan")], start=1):
    ...     monitor.observe(score, step)
    >>> monitor.best, monitor.best_step, monitor.stale, monitor.exhausted
    (2.0, 3, 2, True)
    """

    def __init__(self, module: _Stateful, *, patience: int | None, min_improvement: float) -> None:
        self.module, self.patience, self.min_improvement = module, patience, min_improvement
        self.best, self.best_step, self.stale = -math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def _snapshot(self) -> None:
        self.best_state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def baseline(self, score: float) -> None:
        """Take the current weights as the best so far (step 0), whatever ``score`` is."""
        self.best, self.best_step, self.stale = score, 0, 0
        self._snapshot()

    def observe(self, score: float, step: int) -> None:
        """Record a check's held-out score after ``step`` steps; keep the weights if it improves."""
        if math.isfinite(score) and score > self.best + self.min_improvement:
            self.best, self.best_step, self.stale = score, step, 0
            self._snapshot()
        else:
            self.stale += 1

    @property
    def exhausted(self) -> bool:
        """True once ``patience`` checks in a row brought no improvement (never with ``patience`` None)."""
        return self.patience is not None and self.stale >= self.patience

    def record(
        self, *, check_every: int, validation_fraction: float, n_heldout: int, steps_run: int, score_name: str
    ) -> dict[str, Any]:
        """The early-stopping settings and outcome, for a fit's hyperparameters (the best score under
        ``best_heldout_<score_name>``)."""
        return {
            "patience": self.patience,
            "check_every": check_every,
            "validation_fraction": validation_fraction,
            "min_improvement": self.min_improvement,
            "n_heldout": n_heldout,
            "steps_run": steps_run,
            "best_step": self.best_step,
            f"best_heldout_{score_name}": self.best,
        }

    def restore(self) -> bool:
        """Load the best weights into the module, if any check improved; whether it did."""
        if self.best_state is None:
            return False
        self.module.load_state_dict(self.best_state)
        return True


@dataclass(frozen=True)
class FitInfo:
    """How an estimator's fit went (its ``fit_info_``): steps run, last smoothed loss, whether the plateau
    stop fired, the fingerprint of the fit data, the hyperparameters (those a checkpoint's manifest keeps)."""

    steps_run: int
    final_loss: float
    stopped_early: bool
    data_fingerprint: str
    hyperparameters: dict[str, Any]


@dataclass(frozen=True)
class TrainingRun:
    """What :func:`train_with_early_stopping` did: steps taken, the mean loss of the last window, whether
    the patience stop fired, and the step whose loss was NaN or inf (None when none was). From
    :func:`train_on_pairs` with early stopping also: its record (:meth:`HeldoutMonitor.record`) and whether
    the best weights were restored (False when no check improved)."""

    steps_run: int
    final_loss: float
    stopped_early: bool
    diverged_at_step: int | None
    early_stopping: dict[str, Any] | None = None
    restored: bool = False


def train_with_early_stopping(
    step: Callable[[], float | None],
    *,
    steps: int,
    check_every: int,
    monitor: HeldoutMonitor | None = None,
    evaluate: Callable[[], float] | None = None,
    desc: str = "fit",
    progress: bool = True,
    postfix: Callable[[float], dict[str, str]] = lambda loss: {"loss": f"{loss:.4f}"},
    heldout_label: str = "heldout",
) -> TrainingRun:
    """Run ``step`` (one optimiser step; it returns the loss to average, or None when the loss is NaN or
    inf and no step was taken, which ends the run) up to ``steps`` times.

    Its losses are averaged over windows of ``check_every`` steps (the last window may be shorter). With a
    ``monitor``, ``evaluate()`` (the held-out score, higher is better) is checked at the end of every window
    and the run stops once the monitor is exhausted. The progress bar (``desc``; shown when ``progress``)
    shows ``postfix(window mean)`` and, with a monitor, the last check (``heldout_label``) and the best.
    The best weights are not restored here (:meth:`HeldoutMonitor.restore`).

    Windows of 2 steps, the last one shorter; with patience 1, the second check (no improvement) stops it:

    >>> losses = iter([4.0, 2.0, 3.0, 1.0, 5.0])
    >>> run = train_with_early_stopping(lambda: next(losses), steps=5, check_every=2, progress=False)
    >>> run.steps_run, run.final_loss, run.stopped_early
    (5, 5.0, False)
    >>> losses, scores = iter([4.0, 2.0, 3.0, 1.0, 5.0]), iter([1.0, 0.5])
    >>> monitor = HeldoutMonitor(nn.Linear(1, 1), patience=1, min_improvement=0.0)
    >>> run = train_with_early_stopping(lambda: next(losses), steps=5, check_every=2, monitor=monitor,
    ...                                 evaluate=lambda: next(scores), progress=False)
    >>> run.steps_run, run.final_loss, run.stopped_early, monitor.best_step
    (4, 2.0, True, 2)
    """
    if monitor is not None and evaluate is None:
        raise ValueError("a held-out monitor needs an evaluate function")
    window_sum, window_len, last_window = 0.0, 0, math.nan
    steps_run, stopped_early, diverged = 0, False, None
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for i in bar:
        loss = step()
        if loss is None:
            diverged = i + 1
            break
        steps_run = i + 1
        window_sum += loss
        window_len += 1
        if window_len < check_every and steps_run < steps:
            continue
        last_window, window_sum, window_len = window_sum / window_len, 0.0, 0
        if monitor is None or evaluate is None:
            bar.set_postfix(postfix(last_window))
            continue
        score = evaluate()
        monitor.observe(score, steps_run)
        shown = {heldout_label: f"{score:.4f}", "best": f"{monitor.best:.4f}"}
        bar.set_postfix({**postfix(last_window), **shown})
        if monitor.exhausted:
            stopped_early = True
            break
    bar.close()
    return TrainingRun(steps_run, last_window, stopped_early, diverged)


def train_on_pairs(
    module: _Stateful,
    x: torch.Tensor,
    y: torch.Tensor,
    step: Callable[[torch.Tensor, torch.Tensor], float | None],
    heldout_score: Callable[[torch.Tensor, torch.Tensor], float],
    *,
    gen: torch.Generator,
    steps: int,
    patience: int | None,
    check_every: int,
    validation_fraction: float,
    min_improvement: float,
    min_heldout_rows: int = 1,
    what: str = "an estimator",
    score_name: str = "score",
    desc: str = "fit",
    progress: bool = True,
    postfix: Callable[[float], dict[str, str]] = lambda loss: {"loss": f"{loss:.4f}"},
    heldout_label: str = "heldout",
) -> TrainingRun:
    """Train ``module`` on paired rows with :func:`train_with_early_stopping`, ``step(x_train, y_train)``
    being one optimiser step.

    ``patience=None``: every row trains, ``steps`` steps (fewer only if a loss turns NaN or inf). With
    ``patience``: :func:`split_pairs` holds out rows (``gen`` draws the split, ``min_heldout_rows`` at least),
    ``heldout_score(x_held, y_held)`` is the monitored score (higher is better), and afterwards the weights of
    the best check are restored and the run carries the early-stopping record (the best score under
    ``best_heldout_<score_name>``).
    """
    monitor, evaluate, x_fit, y_fit, n_held = None, None, x, y, 0
    if patience is not None:
        (x_fit, y_fit), (held_x, held_y) = split_pairs(
            x, y, validation_fraction, gen, min_rows=min_heldout_rows, what=what
        )
        monitor = HeldoutMonitor(module, patience=patience, min_improvement=min_improvement)
        evaluate, n_held = partial(heldout_score, held_x, held_y), int(held_x.shape[0])
    run = train_with_early_stopping(
        partial(step, x_fit, y_fit),
        steps=steps,
        check_every=check_every,
        monitor=monitor,
        evaluate=evaluate,
        desc=desc,
        progress=progress,
        postfix=postfix,
        heldout_label=heldout_label,
    )
    if monitor is None:
        return run
    record = monitor.record(
        check_every=check_every,
        validation_fraction=validation_fraction,
        n_heldout=n_held,
        steps_run=run.steps_run,
        score_name=score_name,
    )
    return replace(run, early_stopping=record, restored=monitor.restore())
