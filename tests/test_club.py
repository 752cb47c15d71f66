"""CLUB: closed form vs brute force, Gaussian ground truth, training, checkpoints."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import lmms_emi.estimators.club as club_module
from lmms_emi.estimators.club import (
    CLUB,
    PAPER_ENCODERS,
    CheckpointError,
    EncoderMismatchError,
    club_mutual_information,
)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def brute_force_mi(club: CLUB, x: torch.Tensor, y: torch.Tensor, *, leave_one_out: bool = False) -> float:
    """The pairwise definition, O(N²·d): mean_i log q(y_i|x_i) − mean_{i,j} log q(y_j|x_i) (no constants)."""
    with torch.no_grad():
        mu, logvar = (t.double() for t in club(x))
    y = y.double()
    var = logvar.exp()
    log_q = -((y.unsqueeze(0) - mu.unsqueeze(1)) ** 2 / (2 * var.unsqueeze(1))).sum(-1)  # [i, j]
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
    assert club.manifest is None
    x, y = unit_rows(300, 768, 0), unit_rows(300, 768, 1)
    y_related = F.normalize(x + 0.5 * y, dim=1)
    for target in (y, y_related):
        assert club.mutual_information(x, target) == pytest.approx(brute_force_mi(club, x, target), rel=1e-5)


def test_leave_one_out_is_n_over_n_minus_1_times_the_estimate():
    club = CLUB(16, 16, 32)
    x, y = unit_rows(50, 16, 2), unit_rows(50, 16, 3)
    y = F.normalize(x + y, dim=1)
    full = club.mutual_information(x, y)
    loo = club.mutual_information(x, y, leave_one_out=True)
    assert full == pytest.approx((1 - 1 / 50) * loo, rel=1e-12)
    assert loo == pytest.approx(brute_force_mi(club, x, y, leave_one_out=True), rel=1e-6)
    assert full == pytest.approx(brute_force_mi(club, x, y), rel=1e-6)


def test_runs_at_n_100k_d_768_and_chunking_does_not_change_the_value(monkeypatch):
    club = CLUB(768, 768, 500)
    x, y = unit_rows(100_000, 768, 4), unit_rows(100_000, 768, 5)
    value = club.mutual_information(x, y)
    assert math.isfinite(value)
    mu, logvar = club.conditional_params(x[:20_000])
    chunked = club_mutual_information(mu, logvar, y[:20_000])
    monkeypatch.setattr(club_module, "_CHUNK_ROWS", 10**9)
    assert club_mutual_information(mu, logvar, y[:20_000]) == pytest.approx(chunked, rel=1e-12)


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
    x, y = gaussian_pairs(20_000, 5, 0.6, seed=7)
    return CLUB(5, 5, 64).fit(x, y, steps=3000, batch_size=1024, lr=3e-3, seed=0, progress=False)


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
    club = CLUB(5, 5, 64).fit(x, y, steps=1500, lr=3e-3, seed=0, progress=False)
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
    assert a.fit_info.steps_run == 50 and not a.fit_info.stopped_early
    assert a.fit_info.data_fingerprint == b.fit_info.data_fingerprint


def test_plateau_stop_ends_training_early():
    x, y = gaussian_pairs(5000, 3, 0.5, seed=11)
    club = CLUB(3, 3, 16).fit(
        x, y, steps=20_000, batch_size=256, lr=1e-2, seed=0, patience=3, check_every=100, progress=False
    )
    assert club.fit_info.stopped_early
    assert club.fit_info.steps_run < 20_000
    assert club.fit_info.steps_run % 100 == 0
    assert club.fit_info.steps_run >= 400  # the first window sets the baseline; 3 stale ones follow it


# --- checkpoints ---------------------------------------------------------------------------------------
ENCODERS = {"vision": {"name": "tiny-vision", "layer": -1, "dim": 8}, "text": {"name": "tiny-text", "dim": 8}}


def test_save_and_load_round_trip_with_manifest(tmp_path):
    x, y = gaussian_pairs(500, 8, 0.5, seed=12)
    club = CLUB(8, 8, 16).fit(x, y, steps=20, batch_size=64, progress=False)
    path = club.save(tmp_path / "est.safetensors", club.make_manifest(ENCODERS))
    assert [p.name for p in tmp_path.iterdir()] == ["est.safetensors"]  # no temp file left behind
    loaded = CLUB.from_checkpoint(path, encoders=ENCODERS)
    assert loaded.manifest.encoders == ENCODERS
    assert loaded.manifest.data_fingerprint == club.fit_info.data_fingerprint
    assert loaded.manifest.hyperparameters["steps"] == 20
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
        CLUB(4, 4, 8).mutual_information(x, y)
