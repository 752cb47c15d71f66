"""The run's CLUB fit: the fast fit (closed-form linear-Gaussian start + short full-batch refinement, the
default of a run, ``--estimator-fit fast``) and today's AdamW fit (``--estimator-fit paper``), which stops
when the held-out log-likelihood stops improving; the paper's fixed recipe stays reachable
(``patience=None``, ``--estimator-patience 0``)."""

from __future__ import annotations

import math

import pytest
import torch

from lmms_emi.cli import build_parser
from lmms_emi.cli._options import config_from
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import UsageError
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.club_form import club_mutual_information
from lmms_emi.pipeline.estimator import (
    DEFAULT_PATIENCE,
    EstimatorPolicy,
    fit_pooled_estimator,
    pooled_pairs,
    resolve_estimator,
)

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


def test_the_paper_method_is_todays_fit(early):
    # numbers of this fixture from the code before the fast fit existed (bit-identical there; rel 1e-6 here
    # leaves room for another BLAS); the reference loop below is today's AdamW loop, op for op
    info = early.fit_info_
    assert (info.steps_run, info.hyperparameters["method"]) == (900, "paper")
    assert info.final_loss == pytest.approx(1.6834760677814484, rel=1e-6)
    best = info.hyperparameters["early_stopping"]["best_heldout_log_likelihood"]
    assert best == pytest.approx(-1.8149546384811401, rel=1e-6)
    x, y = gaussian_pairs(1000, seed=5)
    for patience in (2, None):
        kwargs = {"steps": 400, "batch_size": 128, "lr": 1e-2, "seed": 3, "patience": patience}
        club = CLUB(D, D, 8).fit(x, y, method="paper", check_every=50, progress=False, **kwargs)
        reference = _todays_fit(CLUB(D, D, 8), x, y, check_every=50, **kwargs)
        for key, value in reference.items():
            assert torch.equal(club.state_dict()[key], value), (patience, key)


def _todays_fit(
    club: CLUB, x, y, *, steps, batch_size, lr, seed, patience, check_every, validation_fraction=0.1
) -> dict[str, torch.Tensor]:
    """The AdamW fit as it was before ``method`` existed (of early stopping's bookkeeping: the weights)."""
    club.reset_parameters(seed)
    gen = torch.Generator().manual_seed(seed)
    held_x = held_y = None
    if patience is not None:
        order = torch.randperm(x.shape[0], generator=gen)
        n_held = min(max(1, round(validation_fraction * x.shape[0])), x.shape[0] - 1)
        held_x, held_y = x[order[:n_held]], y[order[:n_held]]
        x, y = x[order[n_held:]], y[order[n_held:]]
    optimizer = torch.optim.AdamW(club.parameters(), lr=lr)
    batch = min(batch_size, x.shape[0])
    best_ll, best_state, stale = -math.inf, None, 0
    club.train()
    for step in range(steps):
        idx = torch.randint(x.shape[0], (batch,), generator=gen)
        loss = -club.log_likelihood(x[idx], y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ((step + 1) % check_every and step + 1 < steps) or held_x is None:
            continue
        with torch.no_grad():
            held_ll = float(club.log_likelihood(held_x, held_y))
        if held_ll > best_ll + 1e-3:
            best_ll, stale = held_ll, 0
            best_state = {k: v.detach().clone() for k, v in club.state_dict().items()}
        else:
            stale += 1
        if stale >= patience:
            break
    return best_state if best_state is not None else club.state_dict()


# --- the fast fit on a Gaussian with a known conditional: y = Ax + ε, ε ~ N(0, diag v) ---------------------
A = torch.tensor([[0.9, -0.4, 0.2], [0.3, 0.7, -0.5], [-0.6, 0.1, 0.8]])
NOISE = torch.tensor([0.5, 0.8, 1.5])  # log v ∈ (−1, 1): q(y|x) = N(Ax, diag v) is in the model class
LL_TRUE = float((-1 - NOISE.log()).sum())  # E[−(y−μ)²/σ² − log σ²] of the true q
MI_TRUE = 0.5 * float(torch.logdet(A @ A.T + torch.diag(NOISE)) - NOISE.log().sum())
CLUB_TRUE = float(((A @ A.T).diagonal() / NOISE).sum())  # the CLUB value of the true q, ≥ MI_TRUE


def linear_gaussian_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, x @ A.T + NOISE.sqrt() * torch.randn(n, D, generator=g)


def _fast(seed: int = 0) -> CLUB:
    x, y = linear_gaussian_pairs(4000, seed=1)
    return CLUB(D, D, 8).fit(x, y, method="fast", seed=seed, patience=DEFAULT_PATIENCE, progress=False)


@pytest.fixture(scope="module")
def fast() -> CLUB:
    return _fast()


def _check_fast_against(fast: CLUB, paper: CLUB) -> None:
    x, y = linear_gaussian_pairs(20_000, seed=2)  # a fresh sample neither fit saw
    with torch.no_grad():
        ll_fast, ll_paper = float(fast.log_likelihood(x, y)), float(paper.log_likelihood(x, y))
    assert ll_fast >= ll_paper - 1e-3 * abs(ll_paper)  # within 0.1 % of the paper recipe (or better)
    assert ll_fast == pytest.approx(LL_TRUE, abs=0.05)
    mi = fast.mutual_information(x, y)
    assert mi == pytest.approx(CLUB_TRUE, rel=0.05) and mi > MI_TRUE  # CLUB's value, an upper bound
    true_q = club_mutual_information(x @ A.T, NOISE.log().expand_as(x), y)  # the true q on this sample
    assert mi == pytest.approx(true_q, rel=0.03)


def test_fast_fit_matches_adamw_on_a_known_gaussian(fast):
    x, y = linear_gaussian_pairs(4000, seed=1)
    paper = CLUB(D, D, 8).fit(x, y, steps=1500, batch_size=256, lr=1e-2, progress=False)  # converged
    _check_fast_against(fast, paper)
    hyper = fast.fit_info_.hyperparameters
    assert hyper["method"] == "fast" and hyper["fast_fit"]["rank"] == D
    assert hyper["fast_fit"]["n_heldout"] == 400 and fast.fit_info_.steps_run <= 40


@pytest.mark.slow
def test_fast_fit_matches_the_paper_recipe_on_a_known_gaussian(fast):
    x, y = linear_gaussian_pairs(4000, seed=1)
    _check_fast_against(fast, CLUB(D, D, 8).fit(x, y, steps=5000, batch_size=1024, progress=False))


def test_fast_fit_is_deterministic_for_a_seed(fast):
    again = _fast()
    assert again.fit_info_ == fast.fit_info_
    for key, value in fast.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    other = _fast(seed=1)  # another held-out split, another init of the unused units
    assert not torch.equal(other.p_mu[2].weight, fast.p_mu[2].weight)


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
    assert info.manifest["hyperparameters"]["method"] == "fast"  # the default fit
    assert info.manifest["hyperparameters"]["fast_fit"]["patience"] == DEFAULT_PATIENCE
    paper = EstimatorPolicy("fit", steps=3000, progress=False, fit_method="paper")
    club, info = resolve_estimator(paper, spec, tasks)
    stop = info.manifest["hyperparameters"]["early_stopping"]
    assert stop["patience"] == DEFAULT_PATIENCE and club.fit_info_.stopped_early
    assert club.fit_info_.steps_run == stop["steps_run"] < 3000
    club, info = resolve_estimator(
        EstimatorPolicy("fit", steps=40, progress=False, patience=None, fit_method="paper"), spec, tasks
    )
    assert club.fit_info_.steps_run == 40 and "early_stopping" not in info.manifest["hyperparameters"]
    # --estimator-fit paper is today's fit on the pooled pairs, weight for weight
    x, y = pooled_pairs(tasks)
    today = CLUB(8, 8).fit(x, y, steps=40, seed=0, progress=False)
    for key, value in today.state_dict().items():
        assert torch.equal(value, club.state_dict()[key])
    fast = fit_pooled_estimator(tasks, steps=3000, progress=False)  # the default method
    assert fast.fit_info_.hyperparameters["method"] == "fast"


def test_cli_patience_option():
    base = ["score", "--responses", "r", "--output-path", "o"]
    ns = build_parser().parse_args(base)
    assert EstimatorPolicy.from_config(config_from(ns)).patience == DEFAULT_PATIENCE
    ns = build_parser().parse_args([*base, "--estimator-patience", "0"])
    assert EstimatorPolicy.from_config(config_from(ns)).patience is None  # the paper's fixed recipe


def test_cli_fit_option():
    base = ["score", "--responses", "r", "--output-path", "o"]
    assert EstimatorPolicy.from_config(config_from(build_parser().parse_args(base))).fit_method == "fast"
    ns = build_parser().parse_args([*base, "--estimator-fit", "paper"])
    assert EstimatorPolicy.from_config(config_from(ns)).fit_method == "paper"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--estimator-fit", "sgd"])
    with pytest.raises(UsageError, match="fit"):
        EstimatorPolicy("fit", fit_method="sgd")
