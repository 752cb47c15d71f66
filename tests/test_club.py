"""CLUB: closed form (plain, weighted, per sample) vs brute force, Gaussian ground truth, training,
checkpoints, the fitted-estimator protocol."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import lmms_emi.errors
from lmms_emi.encoder_spec import PAPER_ENCODERS
from lmms_emi.estimators import club_form
from lmms_emi.estimators.checkpoint import MANIFEST_KEY
from lmms_emi.estimators.club import CLUB, CheckpointError, EncoderMismatchError, NotFittedError
from lmms_emi.estimators.club_form import (
    WeightedEstimate,
    club_mutual_information,
    club_sample_contributions,
    weighted_club_mutual_information,
)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def seeded_club(x_dim: int, y_dim: int, hidden: int, seed: int = 0) -> CLUB:
    """A CLUB with seeded random weights, loaded as a checkpoint would be (so it counts as fitted)."""
    club = CLUB(x_dim, y_dim, hidden)
    club.reset_parameters(seed)
    club.load_state_dict(club.state_dict())
    return club.eval()


def pairwise_log_q(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log q(y_j|x_i) without its constant, as an explicit (N, N) matrix [i, j] (builds an N×N×d tensor)."""
    mu, var, y = mu.double(), logvar.double().exp(), y.double()
    return -((y.unsqueeze(0) - mu.unsqueeze(1)) ** 2 / (2 * var.unsqueeze(1))).sum(-1)


def brute_force_weighted_mi(
    mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> float:
    """Σ_i w_i log q(y_i|x_i) − Σ_i Σ_j w_i w_j log q(y_j|x_i) for one weight vector w (Σ w = 1)."""
    log_q, w = pairwise_log_q(mu, logvar, y), w.double()
    return float(w @ log_q.diagonal() - w @ log_q @ w)


def brute_force_mi(club: CLUB, x: torch.Tensor, y: torch.Tensor, *, leave_one_out: bool = False) -> float:
    """The pairwise definition, O(N²·d): mean_i log q(y_i|x_i) − mean_{i,j} log q(y_j|x_i) (no constants)."""
    with torch.no_grad():
        mu, logvar = club(x)
    log_q = pairwise_log_q(mu, logvar, y)  # [i, j]
    n = x.shape[0]
    positive = log_q.diagonal().mean()
    if leave_one_out:
        negative = (log_q.sum() - log_q.diagonal().sum()) / (n * (n - 1))
    else:
        negative = log_q.mean()
    return float(positive - negative)


def gaussian_pairs(n: int, d: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(0, I_d), y = ρx + √(1−ρ²)ε: per coordinate correlation ρ, true MI = −(d/2)·ln(1−ρ²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, y


# --- closed form ---------------------------------------------------------------------------------------
def test_reference_checkpoint_closed_form_equals_brute_force(reference_checkpoint):
    club = CLUB.from_checkpoint(reference_checkpoint)
    assert (club.x_dim, club.y_dim, club.hidden_size) == (768, 768, 500)
    assert club.manifest_ is None and club.fit_info_ is None and club.__sklearn_is_fitted__()
    x, y = unit_rows(150, 768, 0), unit_rows(150, 768, 1)  # the oracle builds a 150×150×768 float64 tensor
    y_related = F.normalize(x + 0.5 * y, dim=1)
    for target in (y, y_related):
        assert club.mutual_information(x, target) == pytest.approx(brute_force_mi(club, x, target), rel=1e-5)


def test_leave_one_out_is_n_over_n_minus_1_times_the_estimate():
    club = seeded_club(16, 16, 32)
    x, y = unit_rows(50, 16, 2), unit_rows(50, 16, 3)
    y = F.normalize(x + y, dim=1)
    full = club.mutual_information(x, y)
    loo = club.mutual_information(x, y, leave_one_out=True)
    assert full == pytest.approx((1 - 1 / 50) * loo, rel=1e-12)
    assert loo == pytest.approx(brute_force_mi(club, x, y, leave_one_out=True), rel=1e-6)
    assert full == pytest.approx(brute_force_mi(club, x, y), rel=1e-6)


@pytest.mark.slow  # the estimator's forward pass over 100k rows of 768 dims (~30 s on 2 cores)
def test_runs_at_n_100k_d_768_and_chunking_does_not_change_the_value(monkeypatch):
    club = seeded_club(768, 768, 500)
    x, y = unit_rows(100_000, 768, 4), unit_rows(100_000, 768, 5)
    value = club.mutual_information(x, y)
    assert math.isfinite(value)
    mu, logvar = club.conditional_params(x[:20_000])
    chunked = club_mutual_information(mu, logvar, y[:20_000])
    monkeypatch.setattr(club_form, "CHUNK_ROWS", 10**9)
    assert club_mutual_information(mu, logvar, y[:20_000]) == pytest.approx(chunked, rel=1e-12)


def conditionals(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random μ, log σ² ∈ (−1, 1) and y that depends on μ."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g)
    logvar = torch.tanh(torch.randn(n, d, generator=g))
    return mu, logvar, 0.5 * mu + torch.randn(n, d, generator=g)


@pytest.mark.parametrize("form", ["moments", "gram", "auto"])
def test_weighted_form_with_uniform_weights_equals_the_pairwise_oracle(form):
    mu, logvar, y = conditionals(40, 6, seed=20)
    oracle = float(pairwise_log_q(mu, logvar, y).diagonal().mean() - pairwise_log_q(mu, logvar, y).mean())
    uniform = weighted_club_mutual_information(
        mu, logvar, y, torch.full((1, 40), 1 / 40, dtype=torch.float64), form=form
    )
    assert uniform.shape == (1,) and uniform.dtype == torch.float64
    assert float(uniform[0]) == pytest.approx(oracle, rel=1e-12)
    assert club_mutual_information(mu, logvar, y) == pytest.approx(oracle, rel=1e-12)
    # any non-negative weights: rows are normalised to sum 1, each against the N×N oracle
    w = torch.rand(3, 40, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    w[1, :10] = 0
    got = weighted_club_mutual_information(mu, logvar, y, w, form=form)
    want = [brute_force_weighted_mi(mu, logvar, y, row / row.sum()) for row in w]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["moments", "gram"])
def test_integer_count_weights_equal_the_estimate_on_the_resampled_rows(form):
    mu, logvar, y = conditionals(60, 5, seed=22)
    index = torch.randint(60, (4, 60), generator=torch.Generator().manual_seed(23))
    counts = torch.zeros(4, 60, dtype=torch.int64).scatter_add_(1, index, torch.ones_like(index))
    got = weighted_club_mutual_information(mu, logvar, y, counts, form=form)
    for row, idx in zip(got.tolist(), index, strict=True):
        assert row == pytest.approx(club_mutual_information(mu[idx], logvar[idx], y[idx]), rel=1e-12)


def test_chunk_boundaries_do_not_change_the_weighted_value(monkeypatch):
    mu, logvar, y = conditionals(50, 4, seed=24)
    weights = torch.randint(0, 3, (5, 50), generator=torch.Generator().manual_seed(25))
    weights[:, 0] = 1  # every row has a positive sum
    whole = weighted_club_mutual_information(mu, logvar, y, weights)
    plain = club_mutual_information(mu, logvar, y)
    monkeypatch.setattr(club_form, "CHUNK_ROWS", 7)  # 50 = 7·7 + 1: a last chunk of one row
    torch.testing.assert_close(
        weighted_club_mutual_information(mu, logvar, y, weights), whole, rtol=1e-12, atol=0
    )
    assert club_mutual_information(mu, logvar, y) == pytest.approx(plain, rel=1e-12)


def test_the_gram_and_moments_forms_agree_on_a_bootstrap_of_wide_embeddings():
    # the shapes of a real bootstrap batch: 90 samples of 768-dim embeddings, 256 replicates, two targets
    mu, logvar, y1 = conditionals(90, 768, seed=27)
    y2 = torch.randn(90, 768, generator=torch.Generator().manual_seed(28))
    index = torch.randint(90, (256, 90), generator=torch.Generator().manual_seed(29))
    counts = torch.zeros(256, 90, dtype=torch.int64).scatter_add_(1, index, torch.ones_like(index))
    moments = weighted_club_mutual_information(mu, logvar, (y1, y2), counts, form="moments")
    gram = weighted_club_mutual_information(mu, logvar, (y1, y2), counts, form="gram")
    assert gram.shape == moments.shape == (2, 256)
    torch.testing.assert_close(gram, moments, rtol=1e-12, atol=1e-12)
    # "auto" takes the cheaper form: the gram one for many weightings of few wide rows (bit for bit) ...
    auto = weighted_club_mutual_information(mu, logvar, (y1, y2), counts)
    assert torch.equal(auto, gram)
    assert WeightedEstimate(mu, logvar, (y1, y2), n_sets=256).form == "gram"
    # ... the moments one for a single weighting (the plain estimate) and when there are more rows than dims
    assert WeightedEstimate(mu, logvar, y1, n_sets=1).form == "moments"
    assert torch.equal(
        weighted_club_mutual_information(mu, logvar, y1, counts[:1]),
        weighted_club_mutual_information(mu, logvar, y1, counts[:1], form="moments"),
    )
    tall = conditionals(800, 4, seed=30)
    assert WeightedEstimate(*tall, n_sets=256).form == "moments"
    with pytest.raises(ValueError, match="form must be"):
        weighted_club_mutual_information(mu, logvar, y1, counts, form="fast")


@pytest.mark.parametrize(("n", "d"), [(30, 4), (12, 40)])
def test_the_automatic_form_matches_the_oracle_for_one_and_many_weightings(n, d):
    """Whichever form "auto" picks (many weightings of few wide rows: gram; else moments), its values are
    those of the N×N pairwise definition."""
    mu, logvar, y = conditionals(n, d, seed=31)
    counts = torch.randint(0, 4, (300, n), generator=torch.Generator().manual_seed(32))
    counts[:, 0] += 1
    for weights in (counts[:1], counts):
        got = weighted_club_mutual_information(mu, logvar, y, weights)
        want = [brute_force_weighted_mi(mu, logvar, y, row.double() / row.sum()) for row in weights[:5]]
        torch.testing.assert_close(got[:5], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (torch.ones(2, 9), r"\(B, 10\) matrix"),
        (torch.ones(10), r"\(B, 10\) matrix"),
        (-torch.ones(1, 10), "non-negative"),
        (torch.zeros(1, 10), "positive sum"),
        (torch.full((1, 10), float("nan")), "finite"),
    ],
)
def test_bad_weights_are_named(weights, message):
    mu, logvar, y = conditionals(10, 3, seed=26)
    with pytest.raises(ValueError, match=message):
        weighted_club_mutual_information(mu, logvar, y, weights)


def test_sample_contributions_are_the_pairwise_per_row_terms_and_average_to_the_estimate():
    """s_i = log q(y_i|x_i) − 1/N Σ_j log q(y_j|x_i) (from the N×N matrix), mean_i s_i = Î; several targets
    give, bit for bit, what one call per target gives."""
    mu, logvar, y = conditionals(40, 6, seed=33)
    log_q = pairwise_log_q(mu, logvar, y)
    s = club_sample_contributions(mu, logvar, y)
    assert s.shape == (40,) and s.dtype == torch.float64
    torch.testing.assert_close(s, log_q.diagonal() - log_q.mean(dim=1), rtol=1e-12, atol=1e-12)
    assert float(s.mean()) == pytest.approx(club_mutual_information(mu, logvar, y), rel=1e-12)
    other = torch.randn(40, 6, generator=torch.Generator().manual_seed(34))
    both = club_sample_contributions(mu, logvar, (y, other))
    assert both.shape == (2, 40)
    assert torch.equal(both[0], s) and torch.equal(both[1], club_sample_contributions(mu, logvar, other))
    with pytest.raises(ValueError, match="must be equal"):
        club_sample_contributions(mu, logvar, y[:, :5])


def test_true_conditional_gives_the_club_value_not_the_mi():
    # with q = the true p(y|x) = N(ρx, 1−ρ²), CLUB = (1 − 1/N)·d·ρ²/(1−ρ²) in expectation, above the MI
    d, rho, n = 5, 0.6, 20_000
    x, y = gaussian_pairs(n, d, rho, seed=6)
    mu, logvar = rho * x, torch.full_like(x, math.log(1 - rho**2))
    expected = (1 - 1 / n) * d * rho**2 / (1 - rho**2)
    assert expected == pytest.approx(2.8125, abs=2e-4)
    assert club_mutual_information(mu, logvar, y) == pytest.approx(expected, rel=0.03)


# --- training ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_gaussian() -> CLUB:
    # 1000 steps of 256 pairs at lr 1e-2 converge on this problem: the held-out value below lands within
    # 0.3% of the true q's (seeds 0, 1, 2), far inside the test's 10%
    x, y = gaussian_pairs(20_000, 5, 0.6, seed=7)
    return CLUB(5, 5, 64).fit(x, y, steps=1000, batch_size=256, lr=1e-2, seed=0, progress=False)


def test_fitted_club_recovers_the_true_q_value_and_upper_bounds_the_mi(fitted_gaussian):
    x, y = gaussian_pairs(20_000, 5, 0.6, seed=8)  # held-out sample
    value = fitted_gaussian.mutual_information(x, y)
    club_with_true_q = (1 - 1 / 20_000) * 5 * 0.36 / 0.64  # ≈ 2.8125
    true_mi = -2.5 * math.log(1 - 0.36)  # ≈ 1.1157
    assert value == pytest.approx(club_with_true_q, rel=0.10)
    assert value > true_mi


def test_independent_variables_give_zero_mi():
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(20_000, 5, generator=g), torch.randn(20_000, 5, generator=g)
    club = CLUB(5, 5, 64).fit(x, y, steps=500, batch_size=256, lr=1e-2, seed=0, progress=False)
    x2, y2 = torch.randn(20_000, 5, generator=g), torch.randn(20_000, 5, generator=g)
    assert abs(club.mutual_information(x2, y2)) < 0.05


def test_fit_is_deterministic_for_a_seed():
    x, y = gaussian_pairs(2000, 4, 0.5, seed=10)
    a = CLUB(4, 4, 16).fit(x, y, steps=50, batch_size=128, seed=3, progress=False)
    b = CLUB(4, 4, 16).fit(x, y, steps=50, batch_size=128, seed=3, progress=False)
    c = CLUB(4, 4, 16).fit(x, y, steps=50, batch_size=128, seed=4, progress=False)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert not torch.equal(a.p_mu[0].weight, c.p_mu[0].weight)
    assert a.fit_info_.steps_run == 50 and not a.fit_info_.stopped_early
    assert a.fit_info_.data_fingerprint == b.fit_info_.data_fingerprint


def test_plateau_stop_ends_training_early():
    x, y = gaussian_pairs(5000, 3, 0.5, seed=11)
    club = CLUB(3, 3, 16).fit(
        x, y, steps=20_000, batch_size=256, lr=1e-2, seed=0, patience=3, check_every=100, progress=False
    )
    assert club.fit_info_.stopped_early
    assert club.fit_info_.steps_run < 20_000
    assert club.fit_info_.steps_run % 100 == 0
    assert club.fit_info_.steps_run >= 400  # the first window sets the baseline; 3 stale ones follow it


# --- checkpoints ---------------------------------------------------------------------------------------
ENCODERS = {"vision": {"name": "tiny-vision", "layer": -1, "dim": 8}, "text": {"name": "tiny-text", "dim": 8}}


def test_save_and_load_round_trip_with_manifest(tmp_path):
    x, y = gaussian_pairs(500, 8, 0.5, seed=12)
    club = CLUB(8, 8, 16).fit(x, y, steps=20, batch_size=64, progress=False)
    assert club.manifest_ is None  # fitted, not saved yet
    path = club.save(tmp_path / "est.safetensors", club.make_manifest(ENCODERS))
    assert club.manifest_.encoders == ENCODERS
    assert [p.name for p in tmp_path.iterdir()] == ["est.safetensors"]  # no temp file left behind
    loaded = CLUB.from_checkpoint(path, encoders=ENCODERS)
    assert loaded.manifest_ == club.manifest_
    assert loaded.manifest_.data_fingerprint == club.fit_info_.data_fingerprint
    assert loaded.manifest_.hyperparameters["steps"] == 20
    assert loaded.mutual_information(x, y) == pytest.approx(club.mutual_information(x, y), rel=1e-12)


def test_encoder_mismatch_is_an_error_that_says_which(tmp_path, reference_checkpoint):
    club = CLUB(8, 8, 16)
    path = club.save(tmp_path / "est.safetensors", club.make_manifest(ENCODERS))
    other = {**ENCODERS, "text": {"name": "other-text", "dim": 8}}
    expected = r"text\.name: checkpoint has 'tiny-text', in use 'other-text'"
    with pytest.raises(EncoderMismatchError, match=expected):
        CLUB.from_checkpoint(path, encoders=other)
    # the paper's plain state dict is taken to be trained on the paper's encoders
    CLUB.from_checkpoint(reference_checkpoint, encoders=PAPER_ENCODERS)
    with pytest.raises(EncoderMismatchError, match="paper's encoders"):
        CLUB.from_checkpoint(reference_checkpoint, encoders=ENCODERS)


def test_shape_mismatch_names_the_dims(reference_checkpoint):
    with pytest.raises(CheckpointError, match=r"x_dim=768 .* but x_dim=384 was requested"):
        CLUB.from_checkpoint(reference_checkpoint, x_dim=384)
    assert CLUB.from_checkpoint(reference_checkpoint, x_dim=768, y_dim=768).y_dim == 768


def test_corrupt_checkpoints_are_reported(tmp_path, reference_checkpoint):
    club = CLUB(8, 8, 16)
    good = club.save(tmp_path / "good.safetensors", club.make_manifest(ENCODERS))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes(reference_checkpoint.read_bytes()[:50_000])
    for path in (truncated, garbage, cut_pt):
        with pytest.raises(CheckpointError, match="corrupt"):
            CLUB.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        CLUB.from_checkpoint(tmp_path / "missing.pt")
    not_club = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, not_club)
    with pytest.raises(CheckpointError, match=r"missing p_mu\.0\.weight"):
        CLUB.from_checkpoint(not_club)


def test_upstream_checkpoint_copy_in_tmp_loads_on_cpu(tmp_path, reference_checkpoint):
    copy = tmp_path / "CLUB_global.pt"
    shutil.copy(reference_checkpoint, copy)
    club = CLUB.from_checkpoint(copy)
    assert next(club.parameters()).device.type == "cpu"
    assert isinstance(club.p_logvar[-1], torch.nn.Tanh)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.ones(1, 4), torch.ones(1, 4), "at least 2"),
        (torch.ones(3, 4), torch.ones(2, 4), "paired"),
        (torch.ones(3, 5), torch.ones(3, 4), "dim 4"),
        (torch.full((3, 4), float("nan")), torch.ones(3, 4), "NaN"),
    ],
)
def test_bad_input_is_named(x, y, message):
    with pytest.raises(ValueError, match=message):
        seeded_club(4, 4, 8).mutual_information(x, y)


# --- the fitted-estimator protocol (scikit-learn's conventions) ----------------------------------------
def test_an_unfitted_club_refuses_to_estimate():
    club = CLUB(8, 8, 16)
    x, y = unit_rows(20, 8, 30), unit_rows(20, 8, 31)
    assert not club.__sklearn_is_fitted__()
    assert club.fit_info_ is None and club.manifest_ is None
    for estimate in (lambda: club.mutual_information(x, y), lambda: club.conditional_params(x)):
        with pytest.raises(NotFittedError, match=r"not fitted: call fit\(\) or load a checkpoint"):
            estimate()
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)


def test_a_fast_fit_keeps_the_layout_and_its_checkpoint_loads_back(tmp_path):
    # the paper's sizes (768 → 250 → 768 per head): state-dict keys and shapes as a freshly built CLUB's
    x = unit_rows(300, 768, seed=40)
    y = F.normalize(x @ torch.randn(768, 768, generator=torch.Generator().manual_seed(41)), dim=1)
    club = CLUB(768, 768, 500).fit(x, y, method="fast", seed=2, patience=3, progress=False)
    fresh = CLUB(768, 768, 500).state_dict()
    assert {k: v.shape for k, v in club.state_dict().items()} == {k: v.shape for k, v in fresh.items()}
    assert club.fit_info_.hyperparameters["method"] == "fast"
    path = club.save(tmp_path / "fast.safetensors", club.make_manifest(ENCODERS))
    loaded = CLUB.from_checkpoint(path, encoders=ENCODERS)
    assert loaded.manifest_.hyperparameters["method"] == "fast"
    assert loaded.manifest_.hyperparameters["fast_fit"]["n_heldout"] == 30
    for key, value in club.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert loaded.mutual_information(x, y) == club.mutual_information(x, y)


def test_fit_methods_are_checked():
    x, y = gaussian_pairs(100, 3, 0.5, seed=42)
    with pytest.raises(ValueError, match="method"):
        CLUB(3, 3, 8).fit(x, y, method="sgd", progress=False)
    with pytest.raises(ValueError, match="warm_start"):
        CLUB(3, 3, 8).fit(x, y, method="fast", warm_start=True, progress=False)
    with pytest.raises(ValueError, match="validation_fraction"):
        CLUB(3, 3, 8).fit(x, y, method="fast", validation_fraction=0.0, progress=False)


def test_fit_load_state_dict_and_checkpoints_mark_the_estimator_fitted(tmp_path):
    x, y = gaussian_pairs(200, 8, 0.5, seed=32)
    club = CLUB(8, 8, 16)
    assert club.fit(x, y, steps=5, batch_size=32, progress=False) is club
    assert club.__sklearn_is_fitted__() and club.fit_info_.steps_run == 5
    value = club.mutual_information(x, y)
    path = club.save(tmp_path / "est.safetensors", club.make_manifest(ENCODERS))
    assert CLUB.from_checkpoint(path).mutual_information(x, y) == value
    other = CLUB(8, 8, 16)
    other.load_state_dict(club.state_dict())
    assert other.__sklearn_is_fitted__() and other.mutual_information(x, y) == value
    other.reset_parameters(0)  # fresh random weights: not fitted any more
    assert not other.__sklearn_is_fitted__()
    partial = CLUB(8, 8, 16)
    partial.load_state_dict(
        {k: v for k, v in club.state_dict().items() if k.startswith("p_mu")}, strict=False
    )
    assert not partial.__sklearn_is_fitted__()


def test_error_types_are_the_ones_of_lmms_emi_errors():
    assert CheckpointError is lmms_emi.errors.CheckpointError
    assert EncoderMismatchError is lmms_emi.errors.EncoderMismatchError
    assert NotFittedError is lmms_emi.errors.NotFittedError


def test_weighted_estimate_of_several_targets_equals_one_at_a_time() -> None:
    """Targets sharing μ, log σ² (a task's responses and references) give, bit for bit, what one call per
    target gives; the shape is (targets, B)."""
    gen = torch.Generator().manual_seed(7)
    mu, logvar, y1, y2 = (torch.randn(37, 5, generator=gen) for _ in range(4))
    counts = torch.randint(0, 3, (6, 37), generator=gen)
    counts[:, 0] += 1  # every row of weights has a positive sum
    both = weighted_club_mutual_information(mu, logvar, (y1, y2), counts)
    assert both.shape == (2, 6)
    assert torch.equal(both[0], weighted_club_mutual_information(mu, logvar, y1, counts))
    assert torch.equal(both[1], weighted_club_mutual_information(mu, logvar, y2, counts))


# --- checkpoint integrity (issue 9) --------------------------------------------------------------------
def _rewrite_safetensors(src, dst, *, state=None, manifest=None) -> None:
    """Copy a project checkpoint with its tensors and/or manifest JSON replaced (bypassing ``save``)."""
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(src), framework="pt") as fh:
        metadata = dict(fh.metadata())
    if manifest is not None:
        metadata[MANIFEST_KEY] = manifest
    save_file(state if state is not None else load_file(str(src)), str(dst), metadata=metadata)


def test_flipped_bits_in_the_weights_fail_the_checksum(tmp_path):
    club = seeded_club(8, 8, 16)
    good = club.save(tmp_path / "good.safetensors", club.make_manifest(ENCODERS))
    assert len(club.manifest_.tensors_sha256) == 64
    data = bytearray(good.read_bytes())
    for offset in (-5, -301, -777):  # inside the tensor payload, at the end of the file
        data[offset] ^= 0b0100_0000  # an exponent bit of a float32
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.safetensors: its tensors do not match the checksum"):
        CLUB.from_checkpoint(flipped, encoders=ENCODERS)
    assert CLUB.from_checkpoint(good, encoders=ENCODERS).manifest_ == club.manifest_


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    import json

    club = seeded_club(8, 8, 16)
    good = club.save(tmp_path / "good.safetensors", club.make_manifest(ENCODERS))
    old = json.loads(club.manifest_.to_json())
    del old["tensors_sha256"]
    legacy = tmp_path / "legacy.safetensors"
    _rewrite_safetensors(good, legacy, manifest=json.dumps(old))
    loaded = CLUB.from_checkpoint(legacy, encoders=ENCODERS)
    assert loaded.manifest_.tensors_sha256 == ""
    x = unit_rows(10, 8, 1)
    assert loaded.mutual_information(x, x) == club.mutual_information(x, x)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x_dim": "8"}, r"manifest field x_dim must be an integer, got '8'"),
        ({"hidden_size": True}, r"manifest field hidden_size must be an integer, got True"),
        ({"encoders": ["vision"]}, r"manifest field encoders must be an object"),
        ({"data_fingerprint": 5}, r"manifest field data_fingerprint must be a string"),
        ({"tensors_sha256": 5}, r"manifest field tensors_sha256 must be a string"),
        ({"x_dim": 9}, r"manifest says x_dim=9 but its tensors have x_dim=8"),
        ({"hidden_size": 32}, r"manifest says hidden_size=32 but its tensors have hidden_size=16"),
        ({"format": "other"}, r"format 'other'"),
    ],
)
def test_a_manifest_with_wrong_types_or_dims_is_one_checkpoint_error(tmp_path, change, message):
    import json

    club = seeded_club(8, 8, 16)
    good = club.save(tmp_path / "good.safetensors", club.make_manifest(ENCODERS))
    bad = tmp_path / "bad.safetensors"
    _rewrite_safetensors(good, bad, manifest=json.dumps({**json.loads(club.manifest_.to_json()), **change}))
    with pytest.raises(CheckpointError, match=message) as info:
        CLUB.from_checkpoint(bad)
    assert "\n" not in str(info.value) and "bad.safetensors" in str(info.value)


def test_a_manifest_that_is_not_a_json_object_is_one_checkpoint_error(tmp_path):
    club = seeded_club(8, 8, 16)
    good = club.save(tmp_path / "good.safetensors", club.make_manifest(ENCODERS))
    for text in ("[1, 2]", "{not json", "null"):
        bad = tmp_path / "bad.safetensors"
        _rewrite_safetensors(good, bad, manifest=text)
        with pytest.raises(CheckpointError, match="unreadable manifest"):
            CLUB.from_checkpoint(bad)
