"""The JSD estimator family: MMD beside RJSD (issue 21, item 2).

Oracles: identical samples give 0; disjoint supports give the derived values; the block-wise kernel sums and
the median bandwidth against brute force; the bound's terms through ``jsd_estimator="mmd"``.

Derivations.
- RJSD, orthogonal supports of rank r each (X spread evenly over e1..er, Y over e(r+1)..e(2r)): Ĉ_X and Ĉ_Y
  have r eigenvalues 1/r (S = ln r each); their mixture has 2r eigenvalues 1/(2r) (S = ln 2r); so
  RJSD = ln 2r − ln r = ln 2, whatever r.
- MMD²_b, point masses a ≠ b with n rows each under the median rule: of the C(2n, 2) pairwise distances, n²
  are |a − b| and n(n − 1) are 0, so the median is |a − b| = σ and k(a, b) = e^{−½}: MMD² = 2 − 2e^{−½}.
- MMD²_b with a fixed σ, two point masses at distance D: 1 + 1 − 2·exp(−D²/(2σ²)); two clusters of spread
  ε far apart (D ≫ σ ≫ ε): within-cluster k ≥ exp(−(2ε)²/(2σ²)), across ≈ 0, so MMD² → 2 (the maximum).
"""

from __future__ import annotations

import math

import pytest
import torch

from lmms_emi.config import EMIConfig
from lmms_emi.emi import TaskEmbeddings, implausible, shift_divergences
from lmms_emi.estimators import mmd as mmd_mod
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.families import JSD_ESTIMATORS, JSD_RANGES
from lmms_emi.estimators.mmd import median_bandwidth, mmd_squared
from lmms_emi.estimators.rjsd import rjsd
from lmms_emi.pipeline.shift import AnalysisSettings, analyze_shift


def _sample(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", ["rjsd", "mmd"])
def test_identical_samples_give_zero(name):
    x = _sample(40, 5, 0)
    value = JSD_ESTIMATORS[name](x, x.clone())
    assert value == pytest.approx(0.0, abs=1e-12)


def test_mmd_of_identical_samples_is_exactly_zero():
    x = _sample(30, 4, 1)
    assert mmd_squared(x, x) == 0.0


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_rjsd_orthogonal_supports_is_ln2(rank):
    eye = torch.eye(2 * rank, dtype=torch.float64)
    x = eye[:rank].repeat(3, 1)  # each of e1..er three times: Ĉ_X = I_r / r
    y = eye[rank:].repeat(2, 1)
    assert rjsd(x, y) == pytest.approx(math.log(2), abs=1e-12)


@pytest.mark.parametrize("n", [2, 5])
def test_mmd_point_masses_under_the_median_rule(n):
    a, b = torch.zeros(n, 3), torch.tensor([[3.0, 4.0, 12.0]]).repeat(n, 1)  # |a − b| = 13
    assert median_bandwidth(torch.cat([a, b])) == pytest.approx(13.0)
    assert mmd_squared(a, b) == pytest.approx(2 - 2 * math.exp(-0.5), abs=1e-12)


def test_mmd_with_a_fixed_bandwidth():
    a, b = torch.zeros(3, 2), torch.tensor([[0.0, 2.0]]).repeat(4, 1)  # D = 2, σ = 1: 2 − 2e^{−2}
    assert mmd_squared(a, b, bandwidth=1.0) == pytest.approx(2 - 2 * math.exp(-2.0), abs=1e-12)
    gen = torch.Generator().manual_seed(2)
    tight_a = 1e-3 * torch.randn(20, 2, generator=gen)
    tight_b = torch.tensor([100.0, 0.0]) + 1e-3 * torch.randn(20, 2, generator=gen)
    assert mmd_squared(tight_a, tight_b, bandwidth=1.0) == pytest.approx(2.0, abs=1e-5)
    assert JSD_RANGES["mmd"] == (0.0, 2.0) and JSD_RANGES["rjsd"] == (0.0, math.log(2))


def test_mmd_against_brute_force(monkeypatch):
    x, y = _sample(7, 3, 3), _sample(5, 3, 4) + 0.5
    pooled = torch.cat([x, y])
    dists = [float((pooled[i] - pooled[j]).norm()) for i in range(12) for j in range(i + 1, 12)]
    sigma = sorted(dists)[(len(dists) - 1) // 2]  # the lower middle of 66 values
    assert median_bandwidth(pooled) == pytest.approx(sigma, rel=1e-12)

    def k(a, b):
        return math.exp(-float((a - b).square().sum()) / (2 * sigma**2))

    xx = sum(k(a, b) for a in x for b in x)
    yy = sum(k(a, b) for a in y for b in y)
    xy = sum(k(a, b) for a in x for b in y)
    biased = xx / 49 + yy / 25 - 2 * xy / 35
    unbiased = (xx - 7) / 42 + (yy - 5) / 20 - 2 * xy / 35
    monkeypatch.setattr(mmd_mod, "BLOCK_ROWS", 2)  # several blocks per sum
    assert mmd_squared(x, y) == pytest.approx(biased, abs=1e-12)
    assert mmd_squared(x, y, unbiased=True) == pytest.approx(unbiased, abs=1e-12)


def test_mmd_refuses_bad_input():
    with pytest.raises(ValueError, match="same dimension"):
        mmd_squared(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        mmd_squared(torch.tensor([[math.nan]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_squared(torch.ones(2, 2), torch.zeros(2, 2), bandwidth=0.0)


def _tasks() -> dict[str, TaskEmbeddings]:
    gen = torch.Generator().manual_seed(5)
    out = {}
    for i, task in enumerate(("id", "ood1", "ood2", "ood3")):
        z_v, z_t = torch.randn(10, 6, generator=gen) + i, torch.randn(10, 6, generator=gen)
        out[task] = TaskEmbeddings(z_v, z_t, z_t + 0.2 * torch.randn(10, 6, generator=gen), z_t)
    return out


def test_bound_terms_through_the_mmd_estimator():
    tasks = _tasks()
    terms = shift_divergences(tasks["id"], {"ood1": tasks["ood1"]}, jsd_estimator="mmd")["ood1"]
    unit = {
        k: torch.nn.functional.normalize(v.to(torch.float32), dim=1) for k, v in vars(tasks["id"]).items()
    }
    other = torch.nn.functional.normalize(tasks["ood1"].z_v.to(torch.float32), dim=1)
    assert terms.jsd_visual == pytest.approx(mmd_squared(unit["z_v"], other), abs=1e-12)
    assert terms.jsd_response_p == pytest.approx(mmd_squared(unit["z_model"], unit["z_ref"]), abs=1e-12)
    default = shift_divergences(tasks["id"], {"ood1": tasks["ood1"]})["ood1"]
    assert default.jsd_visual == pytest.approx(rjsd(unit["z_v"], other), abs=1e-12)


def test_analysis_records_and_checks_the_jsd_estimator():
    tasks = _tasks()
    club = CLUB(6, 6, 8).fit(torch.randn(80, 6), torch.randn(80, 6), steps=5, progress=False)
    result = analyze_shift(tasks, "id", club, n_resamples=0, jsd_estimator="mmd")
    assert result.to_dict()["estimators"] == {"mi": "club", "jsd": "mmd"}
    top = 2 * 2**0.5 + 2 * 2**0.25  # the largest scale-adjusted bound with D ∈ [0, 2]
    assert all(0 <= t.bound <= top for t in result.ood_tasks)
    # the plausibility range follows the estimator: 1.5 is a possible MMD², not a possible RJSD
    assert implausible({"jsd_visual": 1.5}, jsd_max=2.0) is None
    assert "outside the [0, ln 2]" in implausible({"jsd_visual": 1.5})
    with pytest.raises(ValueError, match="rjsd, mmd"):
        analyze_shift(tasks, "id", club, n_resamples=0, jsd_estimator="kl")


def test_option_reaches_the_analysis_settings():
    settings = AnalysisSettings.from_config(EMIConfig(jsd_estimator="mmd"))
    assert settings.jsd_estimator == "mmd" and settings.to_dict()["jsd_estimator"] == "mmd"
    assert AnalysisSettings.from_config(EMIConfig()).jsd_estimator == "rjsd"
