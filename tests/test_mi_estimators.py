"""The MI estimator family: InfoNCE, NWJ and MINE beside CLUB (issue 21, item 1).

Oracles: the bounds' closed forms on hand-built score matrices; the weighted (bootstrap) form against the
bound of the explicitly resampled matrix; MINE's surrogate gradient against the DV bound's; the concat
critic's block-wise scores against its network applied to every pair; correlated Gaussians with closed-form
MI −½·Σ log(1 − ρ²) (and, for CLUB, its value with the true q(y|x): d·ρ²/(1 − ρ²)); checkpoints round-trip
bit for bit and refuse a changed tensor; ``--mi-estimator infonce`` reaches a ``score`` run's reports.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lmms_emi import config as config_mod
from lmms_emi.config import EMIConfig
from lmms_emi.emi import TaskEmbeddings, bootstrap_emi, prepare_task, task_emi
from lmms_emi.errors import CheckpointError, NotFittedError, UsageError
from lmms_emi.estimators import critics, mi_bounds
from lmms_emi.estimators.checkpoint import CRITIC_FORMAT_NAME, FORMAT_NAME, MANIFEST_KEY, read_checkpoint
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.estimators.families import (
    JSD_ESTIMATORS,
    MI_ESTIMATORS,
    MIEstimator,
    load_mi_estimator,
    make_mi_estimator,
)
from lmms_emi.pipeline.estimator import EstimatorPolicy, resolve_estimator
from lmms_emi.pipeline.shift import analyze_shift

BOUNDS = ("infonce", "nwj", "mine")


def correlated_gaussians(d: int, mi: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """x ~ N(0, I_d), y = ρx + √(1 − ρ²)ε with ρ² = 1 − exp(−2·mi/d), so I(X; Y) = −d/2·log(1 − ρ²) = mi;
    also returns ρ."""
    rho = math.sqrt(1 - math.exp(-2 * mi / d))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=gen), rho


# ------------------------------------------------------------------------------------------ the bounds
@pytest.mark.parametrize("n", [2, 5])
def test_bounds_closed_form_on_a_diagonal_score_matrix(n):
    """S = a·I: InfoNCE = a − log(e^a + n − 1) + log n; NWJ = a − e⁻¹·mean_off(e⁰) = a − e⁻¹; DV = a."""
    a = 1.7
    s = a * torch.eye(n)
    assert mi_bounds.bound_from_scores("infonce", s) == pytest.approx(
        a - math.log(math.exp(a) + n - 1) + math.log(n)
    )
    assert mi_bounds.bound_from_scores("nwj", s) == pytest.approx(a - math.exp(-1))
    assert mi_bounds.bound_from_scores("mine", s) == pytest.approx(a)


def test_infonce_never_exceeds_log_n():
    s = 50.0 * torch.eye(6)  # a perfect critic
    assert mi_bounds.bound_from_scores("infonce", s) == pytest.approx(math.log(6), abs=1e-12)


@pytest.mark.parametrize("name", BOUNDS)
def test_row_blocks_and_weighted_forms_agree_with_the_whole_matrix(name):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(9, 9, generator=gen, dtype=torch.float64) * 2
    whole = mi_bounds.bound_from_scores(name, s)
    blocks = mi_bounds.RowTerms.cat([mi_bounds.row_terms(s[i : i + 4], first_row=i) for i in (0, 4, 8)])
    assert mi_bounds.bound_from_terms(name, blocks) == pytest.approx(whole, abs=1e-12)
    uniform = mi_bounds.weighted_bounds(name, s, torch.ones(1, 9))
    assert float(uniform[0]) == pytest.approx(whole, abs=1e-12)
    assert float(mi_bounds.training_bound(name, s)) == pytest.approx(whole, abs=1e-12)


def _scores_and_resamples(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random 7×7 score matrix, 4 resamples of its rows (row numbers) and their counts."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    idx = torch.randint(7, (4, 7), generator=gen)
    return s, idx, torch.zeros(4, 7).scatter_add_(1, idx, torch.ones(4, 7))


@pytest.mark.parametrize("name", BOUNDS)
def test_weighted_bounds_equal_the_bound_of_the_resampled_matrix(name):
    """Brute-force oracle: resample the rows (with repeats), build S[idx][:, idx], take its bound."""
    s, idx, counts = _scores_and_resamples(5)
    got = mi_bounds.weighted_bounds(name, s, counts)
    for b in range(4):
        resampled = s[idx[b]][:, idx[b]]
        assert float(got[b]) == pytest.approx(mi_bounds.bound_from_scores(name, resampled), abs=1e-10)


def _replicate_by_positions(name: str, s: torch.Tensor, idx: torch.Tensor) -> float:
    """Oracle of a bootstrap replicate: over the positions of the resample, each position's negatives are the
    positions holding other rows (InfoNCE: its positive once, weight 1/m, and the others' mean with the rest,
    as in the estimate; NWJ / DV: the mean over pairs of positions of distinct rows)."""
    m = len(idx)
    r = s[idx][:, idx]
    other = idx[:, None] != idx[None, :]
    positive = float(r.diagonal().mean())
    if name == "infonce":
        terms = [
            float(r[a, a] - torch.log((torch.exp(r[a, a]) + (m - 1) * torch.exp(r[a][other[a]]).mean()) / m))
            for a in range(m)
        ]
        return sum(terms) / m
    mean_off = float(torch.exp(r[other]).mean())
    return positive - (mean_off / math.e if name == "nwj" else math.log(mean_off))


@pytest.mark.parametrize("name", BOUNDS)
def test_bootstrap_replicates_of_a_bound_equal_the_oracle_and_the_estimate_for_every_row_once(name):
    s, idx, counts = _scores_and_resamples(6)
    got = mi_bounds.resampled_bounds(name, s, counts)
    for b in range(4):
        assert float(got[b]) == pytest.approx(_replicate_by_positions(name, s, idx[b]), abs=1e-10)
    once = mi_bounds.resampled_bounds(name, s, torch.ones(1, 7))
    assert float(once[0]) == pytest.approx(mi_bounds.bound_from_scores(name, s), abs=1e-12)


@pytest.mark.parametrize("name", BOUNDS)
def test_bootstrap_replicates_of_a_bound_centre_on_the_estimate(name):
    """12 rows of a critic with real dependence: the estimate sits near the median of its replicates (44th to
    50th percentile); the plain bound of the resampled matrix (copies among a row's negatives) leaves it above
    76 % (InfoNCE) to 84 % (NWJ, DV) of them."""
    gen = torch.Generator().manual_seed(0)
    below, below_plain = [], []
    for t in range(30):
        x = torch.randn(12, 8, generator=gen, dtype=torch.float64)
        s = x @ (x + 1.5 * torch.randn(12, 8, generator=gen, dtype=torch.float64)).T / 4
        point = mi_bounds.bound_from_scores(name, s)
        counts = torch.as_tensor(np.random.default_rng(t).multinomial(12, np.full(12, 1 / 12), size=2000))
        below.append(float((mi_bounds.resampled_bounds(name, s, counts) < point).double().mean()))
        below_plain.append(float((mi_bounds.weighted_bounds(name, s, counts) < point).double().mean()))
    assert 0.4 <= np.mean(below) <= 0.6
    assert np.mean(below_plain) > 0.7


def test_mine_surrogate_has_the_dv_gradient_with_the_running_mean():
    """First batch: the moving average is the batch mean, so the surrogate's gradient is −∇ I_DV."""
    gen = torch.Generator().manual_seed(0)
    s1 = torch.randn(5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    loss, log_avg = mi_bounds.mine_surrogate_loss(s1, None)
    (g_surrogate,) = torch.autograd.grad(loss, s1)
    s2 = s1.detach().clone().requires_grad_(True)
    (g_dv,) = torch.autograd.grad(-mi_bounds.training_bound("mine", s2), s2)
    assert torch.allclose(g_surrogate, g_dv, atol=1e-12)
    # the average moves by rate·(batch − average) in linear space
    s3 = s1.detach() + 1.0
    _, log_next = mi_bounds.mine_surrogate_loss(s3, log_avg, rate=0.25)
    batch = math.exp(_log_mean_off(s3))
    assert math.exp(log_next) == pytest.approx(0.75 * math.exp(log_avg) + 0.25 * batch, rel=1e-12)


def _log_mean_off(s: torch.Tensor) -> float:
    n = s.shape[0]
    off = [math.exp(float(s[i, j])) for i in range(n) for j in range(n) if i != j]
    return math.log(sum(off) / len(off))


def test_bounds_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown bound"):
        mi_bounds.bound_from_scores("dv", torch.eye(3))
    with pytest.raises(ValueError, match="N×N"):
        mi_bounds.bound_from_scores("nwj", torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        mi_bounds.weighted_bounds("nwj", torch.eye(3), torch.tensor([[1.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------ critics
def test_concat_critic_blocks_equal_the_network_on_every_pair(monkeypatch):
    critic = critics.ConcatCritic(3, 2, hidden_size=8)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=gen), torch.randn(6, 2, generator=gen)
    monkeypatch.setattr(critics, "PAIR_BUDGET", 2 * 6 * 8)  # two rows per block: three blocks
    got = critic.scores(x, y)
    want = torch.stack([torch.stack([critic.net(torch.cat([xi, yj]))[0] for yj in y]) for xi in x])
    assert got.shape == (5, 6) and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(critic.pair_scores(x, y[:5]), want.diagonal(), atol=1e-6)


def test_separable_critic_scores_are_inner_products():
    critic = critics.SeparableCritic(3, 2, hidden_size=8, embed_dim=4)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    assert torch.allclose(critic.scores(x, y), critic.g(x) @ critic.h(y).T)
    assert torch.allclose(critic.pair_scores(x, y), critic.scores(x, y).diagonal(), atol=1e-6)


# ------------------------------------------------------------------------------------------ the estimator
def test_registry_and_interface():
    assert list(MI_ESTIMATORS) == list(config_mod.MI_ESTIMATOR_NAMES) == ["club", "infonce", "nwj", "mine"]
    assert list(JSD_ESTIMATORS) == list(config_mod.JSD_ESTIMATOR_NAMES) == ["rjsd", "mmd"]
    for name in MI_ESTIMATORS:
        est = make_mi_estimator(name, 3, 3)
        assert isinstance(est, MIEstimator)
    assert isinstance(make_mi_estimator("club", 3, 3), CLUB)
    assert make_mi_estimator("nwj", 3, 3).bound == "nwj"
    with pytest.raises(ValueError, match="club, infonce, nwj, mine"):
        make_mi_estimator("ksg", 3, 3)


def test_unfitted_estimator_refuses_to_estimate():
    with pytest.raises(NotFittedError):
        CriticMI(2, 2).mutual_information(torch.ones(3, 2), torch.ones(3, 2))


@pytest.mark.parametrize("name", BOUNDS)
def test_critic_estimators_on_correlated_gaussians_quick(name):
    """d = 2, I = 0.5 nats, N = 1000, 300 steps: within 0.12 nats (measured 0.04-0.06 above the truth: the
    estimate is taken on the fitted rows)."""
    x, y, _ = correlated_gaussians(2, 0.5, 1000, seed=1)
    est = CriticMI(2, 2, bound=name, hidden_size=32, embed_dim=8)
    est.fit(x, y, steps=300, batch_size=128, lr=2e-3, seed=0, progress=False)
    assert est.mutual_information(x, y) == pytest.approx(0.5, abs=0.12)
    if name == "mine":  # deterministic for a seed (the moving average included)
        again = CriticMI(2, 2, bound=name, hidden_size=32, embed_dim=8)
        again.fit(x, y, steps=300, batch_size=128, lr=2e-3, seed=0, progress=False)
        assert again.mutual_information(x, y) == est.mutual_information(x, y)
    contributions = est.sample_contributions(x, y)
    assert float(contributions.mean()) == pytest.approx(est.mutual_information(x, y), abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", BOUNDS)
def test_critic_estimators_with_early_stopping_on_correlated_gaussians(name):
    """d = 4, I = 1 nat, N = 2000, default sizes, early stopping on a held-out split: within 0.1 nats."""
    x, y, _ = correlated_gaussians(4, 1.0, 2000, seed=2)
    est = CriticMI(4, 4, bound=name).fit(x, y, steps=3000, seed=0, patience=5, progress=False)
    info = est.fit_info_.hyperparameters["early_stopping"]
    assert info["n_heldout"] == 200 and 0 < info["best_step"] <= info["steps_run"] <= 3000
    assert est.mutual_information(x, y) == pytest.approx(1.0, abs=0.1)


def test_club_reaches_its_true_q_value_not_the_mi():
    """CLUB is an upper-bound style estimate: with the true q(y|x) = N(ρx, (1 − ρ²)I) it is
    d·ρ²/(1 − ρ²) (E(y − ρx)² = 1 − ρ², E(y' − ρx)² = 1 + ρ² for an independent y'), above the MI."""
    x, y, rho = correlated_gaussians(2, 0.5, 2000, seed=1)
    true_q = 2 * rho**2 / (1 - rho**2)
    club = CLUB(2, 2, 64).fit(x, y, method="fast", seed=0, patience=5, progress=False)
    assert club.mutual_information(x, y) == pytest.approx(true_q, abs=0.05)
    assert true_q > 1.0  # well above the MI, 0.5


def test_checkpoint_round_trip_and_refusals(tmp_path):
    x, y, _ = correlated_gaussians(3, 0.5, 200, seed=4)
    est = CriticMI(3, 3, bound="mine", hidden_size=16, embed_dim=4).fit(x, y, steps=20, progress=False)
    spec = {"vision": {"name": "v", "dim": 3}}
    path = est.save(tmp_path / "mine.safetensors", est.make_manifest(spec))
    loaded = load_mi_estimator(path, encoders=spec)
    assert isinstance(loaded, CriticMI) and loaded.bound == "mine" and loaded.hidden_size == 16
    assert loaded.mutual_information(x, y) == est.mutual_information(x, y)
    state, manifest = read_checkpoint(path)
    assert manifest.format == CRITIC_FORMAT_NAME and manifest.tensors_sha256
    assert manifest.hyperparameters["mine_moving_average_rate"] == 0.01
    # a changed tensor is refused by its checksum
    state["critic.g.0.bias"] = state["critic.g.0.bias"] + 1
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={MANIFEST_KEY: manifest.to_json()})
    with pytest.raises(CheckpointError, match="checksum"):
        load_mi_estimator(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not a critic"):
        CriticMI.from_checkpoint(_club_file(tmp_path))
    # a CLUB file still loads as a CLUB, its manifest in the CLUB format
    club = load_mi_estimator(_club_file(tmp_path))
    assert isinstance(club, CLUB) and club.manifest_.format == FORMAT_NAME


def _club_file(tmp_path):
    path = tmp_path / "club.safetensors"
    if not path.exists():
        club = CLUB(3, 3, 8).fit(torch.randn(50, 3), torch.randn(50, 3), steps=5, progress=False)
        club.save(path, club.make_manifest({}))
    return path


# ------------------------------------------------------------------------------------------ EMI and the run
def _tasks(n: int = 12, d: int = 6) -> dict[str, TaskEmbeddings]:
    gen = torch.Generator().manual_seed(9)
    out = {}
    for task in ("id", "ood1", "ood2", "ood3"):
        z_v, z_t = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
        out[task] = TaskEmbeddings(
            z_v, z_t, z_v + 0.3 * torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
        )
    return out


def test_critic_emi_bootstrap_and_analysis():
    tasks = _tasks()
    policy = EstimatorPolicy("fit", steps=30, progress=False, mi_estimator="infonce")
    est, info = resolve_estimator(policy, {"vision": {}}, tasks)
    assert isinstance(est, CriticMI) and info.source == "fitted" and info.mi_estimator == "infonce"
    prepared = prepare_task(est, tasks["id"], "id")
    result = task_emi(prepared)
    assert math.isfinite(result.emi) and result.emi == result.mi_model - result.mi_ref
    ci = bootstrap_emi(est, prepared, n_resamples=50, seed=1)
    assert ci.low <= ci.high and math.isfinite(ci.low)
    analysis = analyze_shift(tasks, "id", est, n_resamples=30, seed=3, estimator=info)
    assert analysis.to_dict()["estimators"] == {"mi": "infonce", "jsd": "rjsd"}
    assert all(math.isfinite(t.emi) for t in analysis.tasks)
    again = analyze_shift(tasks, "id", est, n_resamples=30, seed=3, estimator=info)
    assert json.dumps(again.to_dict()) == json.dumps(analysis.to_dict())


def test_options_choose_the_estimators():
    config = EMIConfig.from_sources({"mi_estimator": "nwj"}, environ={"LMMS_EMI_JSD_ESTIMATOR": "mmd"})
    assert config.mi_estimator == "nwj" and config.jsd_estimator == "mmd"
    assert EstimatorPolicy.from_config(config).mi_estimator == "nwj"
    assert config.to_dict()["mi_estimator"] == "nwj"  # recorded with the run's options
    assert EMIConfig().mi_estimator == "club" and EMIConfig().jsd_estimator == "rjsd"
    with pytest.raises(UsageError, match="--mi-estimator"):
        EMIConfig.from_sources({"mi_estimator": "ksg"}, environ={})
    flags = {f.name: f.metadata["flag"] for f in fields(EMIConfig)}
    assert flags["mi_estimator"] == "--mi-estimator" and flags["jsd_estimator"] == "--jsd-estimator"
    with pytest.raises(UsageError, match="registered estimators are CLUBs"):
        EstimatorPolicy("paper-global", mi_estimator="mine").check(None)


def test_score_with_mi_estimator_infonce(tmp_path):
    """``lmms-emi score --mi-estimator infonce --jsd-estimator mmd`` on the demo data: finite EMI, and both
    choices recorded in the report (and the fitted critic saved with its manifest)."""
    from helpers_analysis import artifact
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr

    from lmms_emi.cli import main

    scenarios = ["llava_bench_coco", "llava_bench_coco_frost_5", "llava_bench_coco_sr_7"]
    assert main(["demo-data", str(tmp_path / "demo"), "--scenarios", *scenarios, "--n-images", "3",
                 "--questions-per-image", "2"]) == 0  # fmt: skip
    vision, text = save_tiny_clip_vision(tmp_path / "clip"), save_tiny_xlmr(tmp_path / "xlmr")
    out = tmp_path / "out"
    demo = tmp_path / "demo"
    args = [
        "score", "--dataset", str(demo / "dataset"), "--responses", str(demo / "responses"),
        "--benchmark", "synthetic", "--vision-encoder", f"hf-clip:{vision}",
        "--text-encoder", f"hf-text:{text}", "--text-layer", "0", "--emi-cache", "off",
        "--estimator-steps", "40", "--bootstrap", "20", "-q",
        "--mi-estimator", "infonce", "--jsd-estimator", "mmd", "--output-path", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads(artifact(out, "emi_report_synthetic.json").read_text())
    assert report["estimators"] == {"mi": "infonce", "jsd": "mmd"}
    assert report["estimator"]["mi_estimator"] == "infonce" and report["estimator"]["source"] == "fitted"
    assert all(math.isfinite(t["emi"]) for t in report["tasks"])
    assert all(0 <= t["jsd_visual"] <= 2 for t in report["tasks"][1:])
    saved = load_mi_estimator(artifact(out, "club_fitted.safetensors"))
    assert isinstance(saved, CriticMI) and saved.bound == "infonce"


@pytest.mark.parametrize("name", ["infonce", "nwj", "mine"])
def test_per_sample_terms_of_a_critic_average_to_its_emi(name):
    """The judge's per-sample agreement works with a critic estimator: its per-sample EMI terms average to
    the task's EMI (as CLUB's do)."""
    from lmms_emi.pipeline.agreement import sample_contributions

    emb = _tasks()["id"]
    gen = torch.Generator().manual_seed(1)
    critic = make_mi_estimator(name, 6, 6)
    critic.fit(torch.randn(64, 6, generator=gen), torch.randn(64, 6, generator=gen), steps=5, seed=0)
    terms = sample_contributions(critic, emb)
    assert terms.shape == (emb.n,)
    assert float(terms.mean()) == pytest.approx(task_emi(prepare_task(critic, emb)).emi, abs=1e-9)


def test_nwj_of_huge_scores_is_minus_infinity_not_an_overflow():
    """A diverging critic's NWJ on huge off-diagonal scores is -inf (the fit treats it as divergence)."""
    scores = torch.full((3, 3), 1000.0)
    assert mi_bounds.bound_from_scores("nwj", scores) == -math.inf
