"""EMI, EMID, bounds and bootstrap intervals against hand-computed formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmms_emi.emi import (
    TaskEmbeddings,
    bootstrap_emi,
    bootstrap_emid,
    effective_mutual_information,
    emid,
    emid_upper_bound,
    partial_upper_bound,
    query_embedding,
    task_emi,
)
from lmms_emi.errors import NotFittedError
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.rjsd import rjsd

D = 16


def task(n: int, seed: int, *, shift: float = 0.0, relevance: float = 1.0) -> TaskEmbeddings:
    """Random task embeddings (not normalised) whose model responses depend on the query by ``relevance``."""
    g = torch.Generator().manual_seed(seed)
    z_v = torch.randn(n, D, generator=g) + shift
    z_t = torch.randn(n, D, generator=g) * 2
    z_model = relevance * (z_v + z_t) + torch.randn(n, D, generator=g)
    z_ref = 0.5 * (z_v + z_t) + torch.randn(n, D, generator=g)
    return TaskEmbeddings(z_v, z_t, z_model, z_ref)


@pytest.fixture(scope="module")
def club() -> CLUB:
    pooled = [task(400, s, shift=s / 4) for s in range(4)]
    x = torch.cat([t.query for t in pooled] * 2)
    y = F.normalize(torch.cat([t.z_model for t in pooled] + [t.z_ref for t in pooled]), dim=1)
    return CLUB(D, D, 64).fit(x, y, steps=300, batch_size=256, lr=3e-3, seed=0, progress=False)


def test_emi_is_the_difference_of_two_club_estimates_on_normalised_rows(club):
    p = task(60, 1)
    z_x = (F.normalize(p.z_v, dim=1) + F.normalize(p.z_t, dim=1)) / 2
    mi_model = club.mutual_information(z_x, F.normalize(p.z_model, dim=1))
    mi_ref = club.mutual_information(z_x, F.normalize(p.z_ref, dim=1))
    result = effective_mutual_information(club, *p)
    assert result.mi_model == pytest.approx(mi_model, rel=1e-9)
    assert result.mi_ref == pytest.approx(mi_ref, rel=1e-9)
    assert result.emi == pytest.approx(mi_model - mi_ref, rel=1e-9)
    assert result.n == 60
    assert torch.allclose(query_embedding(p.z_v, p.z_t), z_x)


def test_normalisation_inside_is_idempotent_and_scale_free(club):
    p = task(40, 2)
    scaled = TaskEmbeddings(*(3.7 * z for z in p))
    normalised = TaskEmbeddings(*(F.normalize(z, dim=1) for z in p))
    base = effective_mutual_information(club, *p).emi
    assert effective_mutual_information(club, *scaled).emi == pytest.approx(base, rel=1e-6)
    assert effective_mutual_information(club, *normalised).emi == pytest.approx(base, rel=1e-6)


def test_more_relevant_responses_get_higher_emi(club):
    relevant = effective_mutual_information(club, *task(300, 3, relevance=1.0))
    irrelevant = effective_mutual_information(club, *task(300, 3, relevance=0.0))
    assert relevant.emi > irrelevant.emi
    assert emid(relevant, irrelevant) == pytest.approx(relevant.emi - irrelevant.emi)


def test_upper_bound_forms_match_the_formulas():
    p, q = task(50, 4), task(70, 5, shift=1.0)
    n = [TaskEmbeddings(*(F.normalize(z, dim=1) for z in t)) for t in (p, q)]
    jsd_v, jsd_t = rjsd(n[0].z_v, n[1].z_v), rjsd(n[0].z_t, n[1].z_t)
    jsd_p, jsd_q = rjsd(n[0].z_model, n[0].z_ref), rjsd(n[1].z_model, n[1].z_ref)
    scaled = emid_upper_bound(p, q)
    assert (scaled.jsd_visual, scaled.jsd_text) == pytest.approx((jsd_v, jsd_t), rel=1e-9)
    assert (scaled.jsd_response_p, scaled.jsd_response_q) == pytest.approx((jsd_p, jsd_q), rel=1e-9)
    assert scaled.value == pytest.approx(jsd_v**0.5 + jsd_t**0.5 + jsd_p**0.25 + jsd_q**0.25, rel=1e-9)
    assert scaled.form == "scale_adjusted"
    theorem = emid_upper_bound(tuple(p), tuple(q), entropy_scale=2.5)
    expected = 2.5 * (jsd_v**0.5 + jsd_t**0.5) + 8 * (jsd_p + jsd_q) ** 0.25
    assert theorem.value == pytest.approx(expected, rel=1e-9)
    assert theorem.form == "theorem"
    no_refs = TaskEmbeddings(p.z_v, p.z_t), TaskEmbeddings(q.z_v, q.z_t)
    partial = partial_upper_bound(*no_refs)
    assert partial.value == pytest.approx(jsd_v**0.5 + jsd_t**0.5, rel=1e-9)
    assert partial.jsd_response_p is None
    assert partial_upper_bound(*no_refs, entropy_scale=2.0).value == pytest.approx(2 * partial.value)


def test_identical_tasks_have_zero_input_terms():
    p = task(30, 6)
    bound = emid_upper_bound(p, p)
    assert bound.jsd_visual == pytest.approx(0.0, abs=1e-10)
    assert bound.jsd_text == pytest.approx(0.0, abs=1e-10)
    assert bound.value == pytest.approx(2 * bound.jsd_response_p**0.25, rel=1e-6)


def test_vectorised_bootstrap_replicates_equal_direct_estimates(club):
    """A replicate reweights the rows by their resampling counts: its EMI is the EMI of the resampled rows."""
    from lmms_emi.emi import prepare_task

    p = task(45, 7)
    prepared = prepare_task(club, p, "p")
    rng = np.random.default_rng(0)
    index = rng.integers(0, 45, size=(5, 45))
    counts = torch.zeros(5, 45, dtype=torch.int32).scatter_add_(
        1, torch.as_tensor(index), torch.ones(5, 45, dtype=torch.int32)
    )
    mi_model, mi_ref = prepared.estimate(counts)
    slow = [effective_mutual_information(club, *p.subset(row)).emi for row in index]
    np.testing.assert_allclose((mi_model - mi_ref).numpy(), slow, rtol=1e-6, atol=1e-9)
    point = effective_mutual_information(club, *p)
    every_row_once = prepared.estimate(torch.ones(1, 45, dtype=torch.int32))
    assert float(every_row_once[0, 0] - every_row_once[1, 0]) == pytest.approx(point.emi, rel=1e-12)


def _replicate_by_pairs(club: CLUB, emb: TaskEmbeddings, rows: np.ndarray) -> float:
    """The oracle of a resample's EMI replicate: the resampled rows built out, CLUB's log-density of every
    (query, target) pair of positions formed (m × m), the negative mean over pairs of copies of distinct
    original rows, times (1 − 1/m)."""
    m = len(rows)
    sub = emb.subset(torch.as_tensor(rows))
    z_x = (F.normalize(sub.z_v.double(), dim=1) + F.normalize(sub.z_t.double(), dim=1)) / 2
    mu, logvar = (t.double() for t in club.conditional_params(z_x.float()))
    distinct = torch.as_tensor(rows[:, None] != rows[None, :])
    out = []
    for target in (sub.z_model, sub.z_ref):
        y = F.normalize(target.double(), dim=1)
        log_q = -(((y[None, :, :] - mu[:, None, :]) ** 2) / (2 * logvar.exp()[:, None, :])).sum(-1)  # [i, j]
        loo = log_q.diagonal().mean() - log_q[distinct].mean()
        out.append((1 - 1 / m) * float(loo))
    return out[0] - out[1]


@pytest.mark.parametrize("form", ["gram", "moments"])
def test_bootstrap_replicates_equal_the_pairwise_oracle_and_the_estimate_for_every_row_once(
    club, form, monkeypatch
):
    """A replicate leaves the pairs of a row's copies out of the negative mean (the leave-one-out estimate on
    the resample, times 1 − 1/m), in both closed forms (row chunks of 5); every row drawn once gives the
    estimate itself."""
    from lmms_emi.emi import prepare_task
    from lmms_emi.estimators import club_form
    from lmms_emi.estimators.club_form import WeightedEstimate

    monkeypatch.setattr(club_form, "CHUNK_ROWS", 5)

    p = task(12, 17)
    prepared = prepare_task(club, p, "p")
    targets = (prepared.emb.z_model, prepared.emb.z_ref)
    estimate = WeightedEstimate(prepared.mu, prepared.logvar, targets, form=form)
    rows = np.random.default_rng(3).integers(0, 12, size=(6, 12))
    counts = torch.zeros(6, 12, dtype=torch.int64).scatter_add_(
        1, torch.as_tensor(rows), torch.ones(6, 12, dtype=torch.int64)
    )
    got = estimate.resampled(counts)
    oracle = [_replicate_by_pairs(club, prepared.emb, r) for r in rows]
    np.testing.assert_allclose((got[0] - got[1]).numpy(), oracle, rtol=1e-5, atol=1e-8)
    once = estimate.resampled(torch.ones(1, 12))
    assert float(once[0, 0] - once[1, 0]) == pytest.approx(task_emi(prepared).emi, rel=1e-12)
    with pytest.raises(ValueError, match="whole numbers"):
        estimate.resampled(torch.full((1, 12), 0.5))


def test_bootstrap_replicates_centre_on_the_estimate_of_a_small_task(club):
    """On 12 samples of a model whose answers ignore the query (EMI < 0, as on the demo) the replicates'
    median sits at the estimate; the plain reweighted estimate (copies counted as negative pairs) pulls the
    replicates toward 0 and leaves the estimate near their 27th percentile."""
    from lmms_emi.emi import prepare_task

    below_plain, below = [], []
    for seed in range(20):
        prepared = prepare_task(club, task(12, 100 + seed, relevance=0.0), "p")
        point = task_emi(prepared).emi
        counts = torch.as_tensor(np.random.default_rng(seed).multinomial(12, np.full(12, 1 / 12), size=2000))
        plain, fixed = prepared.estimate(counts), prepared.replicates(counts)
        below_plain.append(float(((plain[0] - plain[1]) < point).double().mean()))
        below.append(float(((fixed[0] - fixed[1]) < point).double().mean()))
    assert 0.45 <= np.mean(below) <= 0.55
    assert abs(np.mean(below_plain) - 0.5) > 0.1  # the same check fails the plain replicates


def test_a_prepared_task_gives_the_numbers_of_its_embeddings(club):
    from lmms_emi.emi import prepare_task, task_emi

    p, q = task(40, 11), task(30, 12, shift=0.5)
    pp, pq = prepare_task(club, p, "p"), prepare_task(club, q, "q")
    assert prepare_task(club, pp) is pp  # prepared once, reused as it is
    assert task_emi(pp) == effective_mutual_information(club, *p)
    assert bootstrap_emi(club, pp, n_resamples=100, seed=3) == bootstrap_emi(club, p, n_resamples=100, seed=3)
    assert bootstrap_emid(club, pp, pq, n_resamples=100, seed=4) == bootstrap_emid(
        club, p, q, n_resamples=100, seed=4
    )
    with pytest.raises(ValueError, match="prepared for another estimator"):
        bootstrap_emi(seeded_club(5), pp, n_resamples=10)


def seeded_club(seed: int) -> CLUB:
    club = CLUB(D, D, 32)
    club.reset_parameters(seed)
    club.load_state_dict(club.state_dict())
    return club.eval()


def test_values_are_those_of_the_implementation_before_the_shared_weighted_form():
    """Regression: EMI as the earlier code (a separate closed form for the bootstrap, with float64 copies of y
    and y²) computed it on this data; the intervals as computed since their replicates leave the pairs of a
    row's copies out of CLUB's negative mean (before: (-0.006007673801241074, 0.00920543787841533) and
    (-0.0018102500164652304, 0.027109819285778207), pulled toward 0 by about Î/n).

    The tolerance is float32's, not float64's: μ(x) and log σ²(x) come from the estimator's float32 MLP, whose
    matmul kernels round differently on different CPUs (AVX2 / AVX-512), about 2e-10 here; a change of formula
    moves these values by far more."""
    tol = 1e-8
    club = seeded_club(1)
    p, q = task(120, 30), task(90, 31, shift=0.5, relevance=0.3)
    before = {  # (emi, mi_model, leave-one-out emi)
        "p": (0.0014546657323618092, -0.012152181685532672, 0.0014668898141463622),
        "q": (-0.012024602647430885, -0.024503161357311853, -0.012159710542345839),
    }
    for name, t in (("p", p), ("q", q)):
        r = effective_mutual_information(club, *t)
        loo = effective_mutual_information(club, *t, leave_one_out=True).emi
        assert (r.emi, r.mi_model, loo) == pytest.approx(before[name], abs=tol)
    a = bootstrap_emi(club, p, n_resamples=200, seed=0)
    assert (a.low, a.high) == pytest.approx((-0.006095548550689794, 0.009481385033329057), abs=tol)
    d = bootstrap_emid(club, p, q, n_resamples=200, seed=0)
    assert (d.low, d.high) == pytest.approx((-0.0015192878541253178, 0.027905429577370747), abs=tol)


def test_an_unfitted_estimator_is_refused():
    p = task(20, 13)
    unfitted = CLUB(D, D, 32)
    for use in (
        lambda: effective_mutual_information(unfitted, *p),
        lambda: bootstrap_emi(unfitted, p, n_resamples=10),
        lambda: bootstrap_emid(unfitted, p, p, n_resamples=10),
    ):
        with pytest.raises(NotFittedError, match=r"call fit\(\) or load a checkpoint"):
            use()


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate(club):
    p, q = task(80, 8), task(80, 9, relevance=0.2)
    a = bootstrap_emi(club, p, n_resamples=300, seed=1)
    assert a == bootstrap_emi(club, p, n_resamples=300, seed=1)
    assert a != bootstrap_emi(club, p, n_resamples=300, seed=2)
    point = effective_mutual_information(club, *p).emi
    assert a.low < point < a.high
    assert (a.confidence_level, a.n_resamples) == (0.95, 300)
    narrow = bootstrap_emi(club, p, n_resamples=300, seed=1, confidence_level=0.5)
    assert a.low < narrow.low < narrow.high < a.high
    d = bootstrap_emid(club, p, q, n_resamples=300, seed=1)
    gap = emid(effective_mutual_information(club, *p), effective_mutual_information(club, *q))
    assert d.low < gap < d.high


def nan_row(z: torch.Tensor, row: int) -> torch.Tensor:
    return z.index_fill(0, torch.tensor([row]), float("nan"))


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (lambda t: TaskEmbeddings(t.z_v[:1], t.z_t[:1], t.z_model[:1], t.z_ref[:1]), "at least 2"),
        (lambda t: TaskEmbeddings(t.z_v, t.z_t[:-1], t.z_model, t.z_ref), r"z_t has 9 rows but .*z_v has 10"),
        (lambda t: TaskEmbeddings(t.z_v, t.z_t, t.z_model[:, :8], t.z_ref), "z_model has dim 8"),
        (
            lambda t: TaskEmbeddings(t.z_v, t.z_t, t.z_model, nan_row(t.z_ref, 3)),
            r"z_ref contains NaN or inf \(first at row 3\)",
        ),
        (lambda t: TaskEmbeddings(t.z_v, t.z_t, t.z_model, None), "z_ref is missing"),
        (lambda t: TaskEmbeddings(t.z_v[0], t.z_t, t.z_model, t.z_ref), "2-D"),
    ],
)
def test_bad_input_raises_a_named_value_error(club, broken, message):
    bad = broken(task(10, 10))
    with pytest.raises(ValueError, match=message):
        effective_mutual_information(club, *bad)
    if "rows" not in message and "2-D" not in message:
        with pytest.raises(ValueError, match=message):
            emid_upper_bound(bad, task(10, 11))


def test_dimension_mismatch_with_the_estimator_is_reported(club):
    t = task(10, 12)
    wide = TaskEmbeddings(*(torch.cat([z, z], dim=1) for z in t))
    with pytest.raises(ValueError, match="32-dim but the estimator takes x of dim 16"):
        effective_mutual_information(club, *wide)


def test_shared_divergences_equal_the_pairwise_bounds():
    from lmms_emi.emi import shift_divergences

    p = task(40, 20)
    shifted = {f"q{i}": task(30 + i, 21 + i, shift=0.3 * i) for i in range(3)}
    shifted["no_refs"] = TaskEmbeddings(shifted["q1"].z_v, shifted["q1"].z_t)
    terms = shift_divergences(p, shifted)
    for name in ("q0", "q1", "q2"):
        for scale in (None, 1.7):
            assert terms[name].bound(scale) == emid_upper_bound(p, shifted[name], entropy_scale=scale)
            assert terms[name].partial(scale) == partial_upper_bound(p, shifted[name], entropy_scale=scale)
    assert terms["no_refs"].jsd_response_q is None
    assert terms["no_refs"].partial() == partial_upper_bound(p, shifted["q1"])
    with pytest.raises(ValueError, match="needs model and reference responses"):
        terms["no_refs"].bound()


def test_divergences_of_tasks_that_share_samples_equal_the_pairwise_values():
    """As in the benchmark: a text shift keeps the ID images, a visual shift the ID questions, two tasks of
    one visual shift share their images, and every task has the same references. Each shared sample is
    decomposed once; every value is still the one its own pair gives."""
    from lmms_emi.emi import shift_divergences

    p, blur, frost, words = task(36, 40), task(36, 41, shift=0.4), task(36, 42, shift=0.8), task(36, 43)
    same_ref = p.z_ref.clone()
    shifted = {
        "text": TaskEmbeddings(p.z_v.clone(), words.z_t, words.z_model, same_ref),
        "visual": TaskEmbeddings(blur.z_v, p.z_t.clone(), blur.z_model, same_ref),
        "joint_a": TaskEmbeddings(frost.z_v, words.z_t.clone(), frost.z_model, same_ref),
        "joint_b": TaskEmbeddings(frost.z_v.clone(), blur.z_t, words.z_model, same_ref),
    }
    terms = shift_divergences(p, shifted)
    for name, q in shifted.items():
        assert terms[name].bound() == emid_upper_bound(p, q), name
    assert terms["joint_a"].jsd_visual == terms["joint_b"].jsd_visual > 0
    assert terms["text"].jsd_visual == terms["visual"].jsd_text == emid_upper_bound(p, p).jsd_visual
    assert terms["text"].jsd_visual < 1e-12


def test_a_task_without_references_has_a_partial_bound_but_no_emi_nor_full_bound(club):
    from lmms_emi.emi import prepare_task

    p = task(20, 50)
    no_refs = TaskEmbeddings(p.z_v, p.z_t, p.z_model)
    partial = partial_upper_bound(p, no_refs)
    assert partial == partial_upper_bound(p, TaskEmbeddings(p.z_v, p.z_t))
    assert partial.value == pytest.approx(0.0, abs=1e-5)  # the same queries: no input shift
    with pytest.raises(ValueError, match=r"p\.z_ref is missing"):
        prepare_task(club, no_refs, "p")
    with pytest.raises(ValueError, match=r"q_emb\.z_ref is missing"):
        emid_upper_bound(p, no_refs)
    prepared = prepare_task(club, p, "p")  # checked and L2-normalised once, reused as it is
    assert torch.allclose(prepared.emb.z_ref.norm(dim=1), torch.ones(20))
    assert prepare_task(club, prepared, "p") is prepared


def test_bootstrap_intervals_of_small_tasks_cover_at_their_level(club):
    """Monte-Carlo coverage with the estimator fixed: 400 tasks of 12 samples drawn from one population of 400
    rows; the parameter is the estimate's mean at n = 12, (1 − 1/12) times the population's EMI (CLUB's
    negative mean includes a 1/n share of self-pairs). The 95 % intervals cover it in 94.75 % of the tasks;
    percentile intervals of the plain reweighted estimate (copies as negative pairs) in 86 %."""
    from scipy import stats

    from lmms_emi.emi import prepare_task

    population = task(400, 7, relevance=0.0)
    truth = (1 - 1 / 12) * task_emi(prepare_task(club, population, "population")).emi
    rng = np.random.default_rng(0)
    covered, covered_plain = 0, 0
    for r in range(400):
        sample = prepare_task(club, population.subset(torch.as_tensor(rng.integers(0, 400, 12))), "sample")
        ci = bootstrap_emi(club, sample, n_resamples=500, seed=r)
        covered += ci.low <= truth <= ci.high

        def plain(idx: np.ndarray, axis: int = -1, sample=sample) -> np.ndarray:
            counts = np.apply_along_axis(np.bincount, -1, np.atleast_2d(idx), minlength=12)
            mi_model, mi_ref = sample.estimate(torch.as_tensor(counts))
            return (mi_model - mi_ref).numpy().reshape(np.shape(idx)[:-1])

        res = stats.bootstrap(
            (np.arange(12),), plain, n_resamples=500, method="percentile", rng=np.random.default_rng(r)
        )
        covered_plain += res.confidence_interval.low <= truth <= res.confidence_interval.high
    assert 0.92 <= covered / 400 <= 0.98
    assert covered_plain / 400 < covered / 400 - 0.03
