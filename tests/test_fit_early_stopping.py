"""The run's CLUB fit stops when the held-out log-likelihood stops improving (the default of a run's fit),
and the paper's fixed recipe stays reachable (``patience=None``, ``--estimator-patience 0``)."""

from __future__ import annotations

import math

import pytest
import torch

from lmms_emi.cli import build_parser
from lmms_emi.cli._options import config_from
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.pipeline.estimator import DEFAULT_PATIENCE, EstimatorPolicy, resolve_estimator

RHO, D = 0.6, 3
CLUB_TRUE_Q = D * RHO**2 / (1 - RHO**2)  # the CLUB value of the true q(y|x): 1.6875 (true MI 0.669)


def gaussian_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I), y = ρx + √(1−ρ²)ε: q(y|x) = N(ρx, 1−ρ²) is in the model class (log σ² = −0.446)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, RHO * x + math.sqrt(1 - RHO**2) * torch.randn(n, D, generator=g)


def _fit(patience: int | None, steps: int = 20_000, seed: int = 0) -> CLUB:
    x, y = gaussian_pairs(4000, seed=1)
    return CLUB(D, D, 8).fit(
        x,
        y,
        steps=steps,
        batch_size=256,
        lr=1e-2,
        seed=seed,
        patience=patience,
        check_every=100,
        progress=False,
    )


@pytest.fixture(scope="module")
def early() -> CLUB:
    return _fit(patience=3)


def test_stops_on_the_plateau_and_restores_the_best_weights(early):
    info = early.fit_info_
    stop = info.hyperparameters["early_stopping"]
    assert info.stopped_early and info.steps_run < 20_000
    # stopped exactly `patience` evaluations after the best one
    assert stop["best_step"] % 100 == 0 and info.steps_run == stop["best_step"] + 3 * 100
    assert stop["n_heldout"] == 400 and stop["patience"] == 3 and info.hyperparameters["steps"] == 20_000
    # the weights are those of the best evaluation: the documented held-out rows give its log-likelihood
    x, y = gaussian_pairs(4000, seed=1)
    held = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:400]
    with torch.no_grad():
        ll = float(early.log_likelihood(x[held], y[held]))
    assert ll == pytest.approx(stop["best_heldout_log_likelihood"], rel=1e-6)


def test_deterministic_for_a_seed(early):
    again = _fit(patience=3)
    assert again.fit_info_ == early.fit_info_
    for key, value in early.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    other = _fit(patience=3, seed=1)
    assert not torch.equal(other.p_mu[0].weight, early.p_mu[0].weight)


def test_as_good_as_the_fixed_recipe_on_a_known_problem(early):
    fixed = _fit(patience=None, steps=1500)
    assert fixed.fit_info_.steps_run == 1500 and "early_stopping" not in fixed.fit_info_.hyperparameters
    x, y = gaussian_pairs(20_000, seed=2)  # a fresh sample neither fit saw
    with torch.no_grad():
        ll_early, ll_fixed = float(early.log_likelihood(x, y)), float(fixed.log_likelihood(x, y))
    # the true q's value: E[−(y−μ)²/σ² − log σ²] = D·(−1 − ln(1−ρ²))
    ll_true = D * (-1 - math.log(1 - RHO**2))
    assert ll_early >= ll_fixed - 0.01 * abs(ll_fixed)
    assert ll_early == pytest.approx(ll_true, abs=0.1)  # finite sample, tanh MLP
    assert early.mutual_information(x, y) == pytest.approx(CLUB_TRUE_Q, rel=0.05)


def test_bad_early_stopping_settings_are_refused():
    x, y = gaussian_pairs(100, seed=3)
    with pytest.raises(ValueError, match="validation_fraction"):
        CLUB(D, D, 8).fit(x, y, steps=5, patience=2, validation_fraction=1.0, progress=False)
    with pytest.raises(UsageError, match="patience"):
        EstimatorPolicy("fit", patience=0)


def test_a_run_fit_stops_early_by_default_and_records_it():
    g = torch.Generator().manual_seed(4)
    tasks = {}
    for name in ("a", "b"):
        x = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
        tasks[name] = TaskEmbeddings(x, x, x + 0.1 * torch.randn(60, 8, generator=g), x)
    spec = {"vision": {"name": "v", "dim": 8}, "text": {"name": "t", "dim": 8}}
    club, info = resolve_estimator(EstimatorPolicy("fit", steps=3000, progress=False), spec, tasks)
    stop = info.manifest["hyperparameters"]["early_stopping"]
    assert stop["patience"] == DEFAULT_PATIENCE and club.fit_info_.stopped_early
    assert club.fit_info_.steps_run == stop["steps_run"] < 3000
    club, info = resolve_estimator(
        EstimatorPolicy("fit", steps=40, progress=False, patience=None), spec, tasks
    )
    assert club.fit_info_.steps_run == 40 and "early_stopping" not in info.manifest["hyperparameters"]


def test_cli_patience_option():
    base = ["score", "--responses", "r", "--output-path", "o"]
    ns = build_parser().parse_args(base)
    assert EstimatorPolicy.from_config(config_from(ns)).patience == DEFAULT_PATIENCE
    ns = build_parser().parse_args([*base, "--estimator-patience", "0"])
    assert EstimatorPolicy.from_config(config_from(ns)).patience is None  # the paper's fixed recipe
