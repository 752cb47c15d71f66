"""RJSD against closed-form values and an independent NumPy eigen-decomposition oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmms_emi.estimators.rjsd import LN2, rjsd, rjsd_from_covariances, second_moment


def oracle_rjsd(x: np.ndarray, y: np.ndarray, *, normalise_each: bool = True) -> float:
    """Textbook RJSD with numpy.linalg.eigh: entropies of trace-normalised second-moment matrices."""

    def entropy(c: np.ndarray) -> float:
        lam = np.linalg.eigh(c / np.trace(c))[0]
        lam = lam[lam > 1e-300]
        return float(-(lam * np.log(lam)).sum())

    cx, cy = x.T @ x, y.T @ y
    if normalise_each:
        cx, cy = cx / np.trace(cx), cy / np.trace(cy)
    return entropy((cx + cy) / 2) - (entropy(cx) + entropy(cy)) / 2


def unit(*coords: float) -> list[float]:
    v = np.asarray(coords, dtype=float)
    return list(v / np.linalg.norm(v))


E1, E2 = [1.0, 0.0], [0.0, 1.0]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_matches_eigendecomposition_oracle_on_random_embeddings():
    rng = np.random.default_rng(0)
    for n, m, d in [(50, 80, 16), (200, 30, 64), (90, 60, 768)]:
        x = rng.normal(size=(n, d)) + 0.3
        y = rng.normal(size=(m, d)) * np.linspace(0.2, 2, d)
        assert rjsd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(oracle_rjsd(x, y), abs=1e-10)


def test_identical_samples_give_zero():
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(1))
    assert rjsd(x, x) == pytest.approx(0.0, abs=1e-12)


def test_orthogonal_subspaces_give_ln2():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(40, 5, generator=g), torch.zeros(40, 5)], dim=1)
    y = torch.cat([torch.zeros(70, 5), torch.randn(70, 5, generator=g)], dim=1)
    assert rjsd(x, y) == pytest.approx(math.log(2), abs=1e-12)


def test_symmetric_and_in_range():
    rng = np.random.default_rng(3)
    for _ in range(20):
        d = int(rng.integers(2, 20))
        x = torch.from_numpy(rng.normal(size=(int(rng.integers(1, 30)), d)))
        y = torch.from_numpy(rng.normal(size=(int(rng.integers(1, 30)), d)) + rng.normal(size=d))
        value = rjsd(x, y)
        assert value == pytest.approx(rjsd(y, x), abs=1e-12)
        assert 0.0 <= value <= LN2


def test_duplicating_rows_does_not_change_value():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(25, 12, generator=g), torch.randn(40, 12, generator=g) + 0.5
    assert rjsd(torch.cat([x, x]), y) == pytest.approx(rjsd(x, y), abs=1e-12)
    assert rjsd(x, torch.cat([y, y, y])) == pytest.approx(rjsd(x, y), abs=1e-12)


def test_known_values_and_what_an_unnormalised_mixture_would_give():
    # {e1} vs {e2, e2, e2}: disjoint supports -> ln 2 (mixing raw XᵀX would weight by size: 0.562335)
    assert rjsd(t([E1]), t([E2, E2, E2])) == pytest.approx(0.693147, abs=1e-6)
    assert oracle_rjsd(np.array([E1]), np.array([E2] * 3), normalise_each=False) == pytest.approx(
        0.562335, abs=1e-6
    )
    # {e1, e2} vs ten copies of {e1}
    assert rjsd(t([E1, E2]), t([E1] * 10)) == pytest.approx(0.215762, abs=1e-6)
    assert oracle_rjsd(np.array([E1, E2]), np.array([E1] * 10), normalise_each=False) == pytest.approx(
        -0.0597, abs=1e-4
    )
    # {e1} vs a unit vector at 60 degrees
    at60 = [math.cos(math.pi / 3), math.sin(math.pi / 3)]
    assert rjsd(t([E1]), t([at60])) == pytest.approx(0.562335, abs=1e-6)
    # equal second moments are invisible to the linear kernel: RJSD is only a lower bound on the JSD
    rotated = [unit(1, 1), unit(1, -1)]
    assert rjsd(t([E1, E2]), t(rotated)) == pytest.approx(0.0, abs=1e-12)


def test_from_covariances_accepts_raw_or_normalised_second_moments():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 8, generator=g), torch.randn(50, 8, generator=g) * 2
    raw = rjsd_from_covariances(x.double().T @ x.double(), y.double().T @ y.double())
    assert raw == pytest.approx(rjsd(x, y), abs=1e-12)
    assert rjsd_from_covariances(second_moment(x), second_moment(y)) == pytest.approx(raw, abs=1e-12)
    assert torch.trace(second_moment(x)).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.zeros(3, 4), torch.ones(3, 4), "zero"),
        (torch.ones(3, 4), torch.ones(3, 5), "same dimension"),
        (torch.ones(4), torch.ones(3, 4), "2-D"),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(2, 2), "NaN"),
        (torch.ones(0, 4), torch.ones(2, 4), "no rows"),
    ],
)
def test_bad_input_is_named(x, y, message):
    with pytest.raises(ValueError, match=message):
        rjsd(x, y)
