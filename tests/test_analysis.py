"""The run pipeline (lmms_emi.pipeline): values equal direct lmms_emi.emi calls, scipy correlations,
determinism, the estimator policy, the one grouping rule, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_analysis import ID_TASK, shifted_tasks, small_club, unit
from scipy import stats

from lmms_emi import emi as emi_lib
from lmms_emi.embed.store import load_embeddings, save_embeddings
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.encoder_spec import PAPER_ENCODERS
from lmms_emi.estimators.club import CLUB, CheckpointError, EncoderMismatchError
from lmms_emi.pipeline.estimator import (
    EstimatorPolicy,
    pooled_pairs,
    resolve_estimator,
)
from lmms_emi.pipeline.records import Sample, embed_tasks
from lmms_emi.pipeline.run import plan_run
from lmms_emi.pipeline.shift import analyze_shift, correlate, shift_kind, task_seed

SPEC = {
    "vision": {"name": "test-vision-encoder", "dim": 16},
    "text": {"name": "test-text-encoder", "dim": 16},
}


@pytest.fixture(scope="module")
def tasks():
    return shifted_tasks(5)


@pytest.fixture(scope="module")
def club():
    return small_club()


def test_values_equal_direct_emi_calls(tasks, club):
    res = analyze_shift(tasks, ID_TASK, club, entropy_scale=2.5, n_resamples=40, seed=3)
    p = tasks[ID_TASK]
    p_emi = emi_lib.effective_mutual_information(club, *p)
    for name, emb in tasks.items():
        row = res.task(name)
        direct = emi_lib.effective_mutual_information(club, *emb)
        assert (row.emi, row.mi_model, row.mi_ref, row.n) == (
            direct.emi,
            direct.mi_model,
            direct.mi_ref,
            direct.n,
        )
        ci = emi_lib.bootstrap_emi(club, emb, n_resamples=40, seed=task_seed(3, name))
        assert row.emi_ci == (ci.low, ci.high)
        if name == ID_TASK:
            assert row.shift_kind == "id" and row.emid is None and row.bound is None
            continue
        assert row.emid == emi_lib.emid(p_emi, direct)
        ci = emi_lib.bootstrap_emid(club, p, emb, n_resamples=40, seed=task_seed(3, f"{ID_TASK}->{name}"))
        assert row.emid_ci == (ci.low, ci.high)
        bound = emi_lib.emid_upper_bound(p, emb)
        assert (row.bound, row.jsd_visual, row.jsd_text, row.jsd_response_p, row.jsd_response_q) == (
            bound.value,
            bound.jsd_visual,
            bound.jsd_text,
            bound.jsd_response_p,
            bound.jsd_response_q,
        )
        assert row.bound_theorem == emi_lib.emid_upper_bound(p, emb, entropy_scale=2.5).value
        assert row.partial_bound == emi_lib.partial_upper_bound(p, emb).value


def test_correlations_equal_scipy(tasks, club):
    res = analyze_shift(tasks, ID_TASK, club, n_resamples=0)
    ood = [t for t in res.tasks if t.task != ID_TASK]
    x, y = [t.emid for t in ood], [t.bound for t in ood]
    corr = res.correlation
    assert corr.n_tasks == 5 and list(corr.tasks) == [t.task for t in ood]
    pr = stats.pearsonr(x, y)
    assert (corr.pearson_r, corr.pearson_p) == (float(pr.statistic), float(pr.pvalue))
    assert corr.spearman_rho == float(stats.spearmanr(x, y).statistic)
    assert corr.kendall_tau == float(stats.kendalltau(x, y).statistic)
    partial = res.correlations["partial_bound"]
    assert partial.pearson_r == float(stats.pearsonr(x, [t.partial_bound for t in ood]).statistic)
    assert "bound_theorem" not in res.correlations
    assert all(t.emi_ci is None and t.emid_ci is None for t in res.tasks)  # n_resamples=0: no intervals


def test_deterministic_and_json_ready(tasks, club):
    a = analyze_shift(tasks, ID_TASK, club, n_resamples=30, seed=7).to_dict()
    b = analyze_shift(tasks, ID_TASK, club, n_resamples=30, seed=7).to_dict()
    c = analyze_shift(tasks, ID_TASK, club, n_resamples=30, seed=8).to_dict()
    assert json.dumps(a, allow_nan=False) == json.dumps(b, allow_nan=False)
    assert a["tasks"][1]["emid"] == c["tasks"][1]["emid"]  # estimates do not depend on the seed
    assert a["tasks"][1]["emid_ci"] != c["tasks"][1]["emid_ci"]  # intervals do
    assert a["settings"] == {"entropy_scale": None, "n_resamples": 30, "confidence_level": 0.95, "seed": 7}
    # task order does not change a task's numbers (per-task seeds)
    reordered = dict(reversed(list(tasks.items())))
    d = analyze_shift(reordered, ID_TASK, club, n_resamples=30, seed=7).to_dict()
    assert {t["task"]: t for t in d["tasks"]} == {t["task"]: t for t in a["tasks"]}


def test_few_tasks_do_not_crash(tasks, club):
    only_id = analyze_shift({ID_TASK: tasks[ID_TASK]}, ID_TASK, club, n_resamples=5)
    assert only_id.correlation is None and len(only_id.tasks) == 1
    json.dumps(only_id.to_dict(), allow_nan=False)
    two_ood = {k: tasks[k] for k in list(tasks)[:3]}
    res = analyze_shift(two_ood, ID_TASK, club, n_resamples=0)
    assert res.correlations == {"bound": None, "partial_bound": None}
    assert correlate([1.0, 2.0], [3.0, 4.0]) is None


def test_constant_bound_gives_null_correlation():
    corr = correlate([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    assert math.isnan(corr.pearson_r)


def test_tasks_without_references_get_partial_bound_only(club):
    with_refs = shifted_tasks(4)
    no_refs = shifted_tasks(4, references=False)
    mixed = dict(with_refs)
    names = list(with_refs)
    mixed[names[2]] = no_refs[names[2]]
    res = analyze_shift(mixed, ID_TASK, club, n_resamples=0)
    row = res.task(names[2])
    assert row.emi is None and row.emid is None and row.bound is None
    assert row.partial_bound == emi_lib.partial_upper_bound(with_refs[ID_TASK], no_refs[names[2]]).value
    assert names[2] not in res.correlation.tasks and res.correlation.n_tasks == 3
    # no references at all (even on the ID task): only partial bounds, no crash
    res = analyze_shift(no_refs, ID_TASK, club, n_resamples=10)
    assert all(t.emi is None for t in res.tasks)
    assert all(t.partial_bound is not None for t in res.ood_tasks)
    assert res.correlation is None


def test_errors_name_the_task(tasks, club):
    bad = dict(tasks)
    one = TaskEmbeddings(*(z[:1] for z in tasks[ID_TASK]))
    bad["lbshift_syn_llava_bench_coco_frost_5"] = one
    with pytest.raises(ValueError, match=r"task 'lbshift_syn_llava_bench_coco_frost_5' has 1 sample"):
        analyze_shift(bad, ID_TASK, club)
    with pytest.raises(ValueError, match=r"ID task 'nope' is not among the tasks"):
        analyze_shift(tasks, "nope", club)
    gen = torch.Generator().manual_seed(1)
    wrong_dim = TaskEmbeddings(unit(5, 8, gen), unit(5, 8, gen), unit(5, 8, gen), unit(5, 8, gen))
    with pytest.raises(ValueError, match=r"task 'odd'"):
        analyze_shift({**tasks, "odd": wrong_dim}, ID_TASK, club, n_resamples=0)
    p = tasks[ID_TASK]
    short = TaskEmbeddings(p.z_v, p.z_t, p.z_model[:3], p.z_ref)
    with pytest.raises(ValueError, match=r"task 'short'"):
        analyze_shift({**tasks, "short": short}, ID_TASK, club, n_resamples=0)


def test_shift_kind():
    assert shift_kind(ID_TASK, ID_TASK) == "id"
    assert shift_kind("lbshift_syn_llava_bench_coco_frost_1", ID_TASK) == "visual"
    assert shift_kind("lbshift_syn_llava_bench_coco_sr_4", ID_TASK) == "text"
    assert shift_kind("llava_bench_coco_frost_1_sr_4", "llava_bench_coco") == "joint"  # bare split names
    assert shift_kind("something_else", ID_TASK) == "ood"


def test_reference_checkpoint_through_analysis(reference_checkpoint):
    """The paper's CLUB (768-dim) on random unit embeddings: analysis equals direct calls and is finite.

    One OOD task only: each 768-dim RJSD term costs several 768x768 eigendecompositions.
    """
    club = CLUB.from_checkpoint(reference_checkpoint)
    assert club.manifest_ is None and (club.x_dim, club.y_dim) == (768, 768)
    tasks = shifted_tasks(1, n=16, d=768, seed=5)
    res = analyze_shift(tasks, ID_TASK, club, n_resamples=20)
    for name, emb in tasks.items():
        direct = emi_lib.effective_mutual_information(club, *emb)
        assert res.task(name).emi == direct.emi and math.isfinite(direct.emi)
    ood = res.ood_tasks[0]
    assert ood.emid == res.task(ID_TASK).emi - ood.emi and math.isfinite(ood.bound)
    assert res.correlation is None  # a single OOD task
    # resolve_estimator with the path and the paper's encoder spec loads the same estimator
    loaded, info = resolve_estimator(EstimatorPolicy(str(reference_checkpoint)), PAPER_ENCODERS, tasks)
    assert info.source == "checkpoint" and info.comparability == "global" and "paper" in info.note
    for emb in tasks.values():
        assert emi_lib.effective_mutual_information(loaded, *emb) == emi_lib.effective_mutual_information(
            club, *emb
        )
    with pytest.raises(EncoderMismatchError, match="trained on other encoders"):
        resolve_estimator(EstimatorPolicy(str(reference_checkpoint)), SPEC, tasks)


def test_resolve_estimator_fits_saves_and_reloads(tmp_path, tasks, monkeypatch):
    fit = EstimatorPolicy(None, steps=30, progress=False, seed=1)
    club, info = resolve_estimator(fit, SPEC, tasks)
    assert info.source == "fitted" and info.comparability == "run" and "only within this run" in info.note
    assert info.path is None  # the report writer saves it beside the reports
    saved = club.save(tmp_path / "fitted.safetensors", club.make_manifest(SPEC))
    assert info.manifest["encoders"] == SPEC and info.manifest["hyperparameters"]["steps"] == 30
    # the pooled pairs are the paper's protocol: (query, response) and (query, reference) of every task
    x, _y = pooled_pairs(tasks)
    assert x.shape[0] == 2 * sum(e.n for e in tasks.values())
    assert club.fit_info_.data_fingerprint == info.manifest["data_fingerprint"]
    again, info2 = resolve_estimator(EstimatorPolicy(str(saved)), SPEC, tasks)
    assert info2.source == "checkpoint"
    a = analyze_shift(tasks, ID_TASK, club, n_resamples=0).to_dict()
    assert analyze_shift(tasks, ID_TASK, again, n_resamples=0).to_dict() == a
    refit, _ = resolve_estimator(EstimatorPolicy("fit", steps=30, progress=False, seed=1), SPEC, tasks)
    assert analyze_shift(tasks, ID_TASK, refit, n_resamples=0).to_dict() == a  # deterministic fit
    other = {"vision": {"name": "other"}, "text": {"name": "test-text-encoder", "dim": 16}}
    with pytest.raises(EncoderMismatchError):
        resolve_estimator(EstimatorPolicy(str(saved)), other, tasks)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_estimator(EstimatorPolicy(str(tmp_path / "missing.safetensors")), SPEC, tasks)


def test_default_choice_without_a_registered_estimator_fits_on_the_run(tasks):
    """No estimator is registered for these encoders: the default choice fits one, as ``fit`` does."""
    policy = EstimatorPolicy(None, steps=30, progress=False, seed=1)
    assert policy.choice.kind == "default"
    _club, info = resolve_estimator(policy, SPEC, tasks)
    assert info.source == "fitted" and info.comparability == "run"


def test_embeddings_roundtrip(tmp_path, tasks):
    partial = dict(tasks)
    partial["no_refs"] = TaskEmbeddings(tasks[ID_TASK].z_v, tasks[ID_TASK].z_t)
    path = save_embeddings(partial, tmp_path / "e.safetensors", encoders=SPEC)
    loaded, spec = load_embeddings(path)
    assert spec == SPEC and list(loaded) == list(partial)
    for name, emb in partial.items():
        for a, b in zip(emb, loaded[name], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not an lmms-emi embeddings file"):
        load_embeddings(bad)


# ---------------------------------------------------------------------------------------------------------
# embed_tasks with a real (tiny, random-weight) embedder
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr

    from lmms_emi.embed import Embedder

    root = tmp_path_factory.mktemp("enc")
    vision = save_tiny_clip_vision(root / "clip")
    text = save_tiny_xlmr(root / "xlmr")
    return Embedder(vision=f"hf-clip:{vision}", text=f"hf-text:{text}", cache_dir=False, progress=False)


def _photo_samples(task: str, n: int, *, offset: int = 0, refs: bool = True) -> list[Sample]:
    from helpers_embed import photos
    from PIL import Image

    imgs = [Image.fromarray(a) for a in photos().values()]
    return [
        Sample(
            task,
            doc_id=i,
            image=imgs[(i + offset) % len(imgs)],
            question=f"what is in the picture {i}",
            response=f"a cat and a dog {i + offset}",
            reference=f"the photo shows {i}" if refs else None,
        )
        for i in range(n)
    ]


def test_embed_tasks_matches_embed_task(tiny_embedder):
    tiny_embedder.stats.reset()
    a = _photo_samples("A", 4)
    b = _photo_samples("B", 3, offset=1, refs=False)
    out = embed_tasks(tiny_embedder, {"A": list(reversed(a)), "B": b})  # A given out of doc order
    # one image call over both tasks: 7 images requested, 4 distinct photos, deduplicated across tasks
    first = tiny_embedder.stats.image
    assert (first.requested, first.unique) == (7, 4)
    for name, samples, refs in (("A", a, True), ("B", b, False)):
        direct = tiny_embedder.embed_task(
            [s.image for s in samples],
            [s.question for s in samples],
            [s.response for s in samples],
            [s.reference for s in samples] if refs else None,
        )
        for got, want in zip(out[name], direct, strict=True):
            assert (got is None and want is None) or torch.allclose(got, want, atol=1e-6)
    assert out["B"].z_ref is None


def test_embed_tasks_errors(tiny_embedder):
    samples = _photo_samples("T", 3)
    broken = [samples[0], Sample("T", 1, samples[1].image, "q", None, "r"), samples[2]]
    with pytest.raises(ValueError, match=r"task 'T': response is missing for doc_id 1"):
        embed_tasks(tiny_embedder, {"T": broken})
    no_image = [Sample("T", 0, None, "q", "a", "r"), *samples[1:]]
    with pytest.raises(ValueError, match=r"task 'T': no image for doc_id 0"):
        embed_tasks(tiny_embedder, {"T": no_image})
    with pytest.raises(ValueError, match=r"task 'T': doc_id 1 appears more than once"):
        embed_tasks(tiny_embedder, {"T": [*samples, samples[1]]})
    with pytest.raises(ValueError, match=r"task 'E' has no samples"):
        embed_tasks(tiny_embedder, {"E": []})


def test_plan_groups_by_benchmark_in_run_order():
    """One grouping rule for every entry point: ID, visual, text, joint (each in scenario order); a benchmark
    without its ID task is analysed task by task with a warning; other tasks alone, in the given order."""
    from lmms_emi import scenarios as sc

    syn = sc.scenarios("synthetic")
    given = [syn[6].task, "mme", syn[1].task, syn[0].task, syn[5].task, sc.scenarios("natural")[3].task]
    plan = plan_run(given)
    assert plan.groups == {"synthetic": (syn[0].task, (syn[0].task, syn[5].task, syn[1].task, syn[6].task))}
    assert [sc.scenario_for_task(t).shift_kind for t in plan.groups["synthetic"][1]] == [
        "id",
        "visual",
        "text",
        "joint",
    ]
    assert plan.singles == (sc.scenarios("natural")[3].task, "mme")
    assert len(plan.warnings) == 1 and "natural" in plan.warnings[0]


# --- degenerate inputs and estimators are flagged per task (issue 9) -------------------------------------
def _warned(result, task: str, fragment: str) -> bool:
    return any(fragment in w for w in result.task(task).warnings)


def test_clean_tasks_carry_no_warnings(tasks, club):
    res = analyze_shift(tasks, ID_TASK, club, n_resamples=20)
    assert all(t.warnings == () for t in res.tasks)
    assert res.to_dict()["tasks"][0]["warnings"] == []


def test_a_tiny_split_gets_no_interval_and_a_warning(club):
    from lmms_emi.pipeline.shift import MIN_INTERVAL_SAMPLES

    small = shifted_tasks(3, n=MIN_INTERVAL_SAMPLES - 1)
    res = analyze_shift(small, ID_TASK, club, n_resamples=50)
    for row in res.tasks:
        assert row.emi is not None and row.emi_ci is None and row.emid_ci is None
        assert _warned(res, row.task, f"only {MIN_INTERVAL_SAMPLES - 1} samples: no bootstrap interval")
    enough = analyze_shift(shifted_tasks(3, n=MIN_INTERVAL_SAMPLES), ID_TASK, club, n_resamples=50)
    assert all(t.emi_ci is not None and t.warnings == () for t in enough.tasks)


def test_identical_or_zero_embeddings_are_flagged(tasks, club):
    ood = [t for t in tasks if t != ID_TASK]
    emb = dict(tasks)
    z = emb[ood[0]]
    emb[ood[0]] = TaskEmbeddings(z.z_v, z.z_t, z.z_model[:1].expand_as(z.z_model).clone(), z.z_ref)
    z = emb[ood[1]]
    emb[ood[1]] = TaskEmbeddings(torch.zeros_like(z.z_v), z.z_t, z.z_model, z.z_ref)
    z = emb[ood[2]]
    emb[ood[2]] = TaskEmbeddings(z.z_v, z.z_t[:1].expand_as(z.z_t).clone(), z.z_model, z.z_ref)
    with pytest.raises(ValueError, match=f"task '{ood[1]}': all 24 image-query embeddings are zero"):
        analyze_shift(emb, ID_TASK, club, n_resamples=0)
    del emb[ood[1]]
    res = analyze_shift(emb, ID_TASK, club, n_resamples=0)
    assert _warned(res, ood[0], "all 24 response embeddings are identical")
    assert _warned(res, ood[2], "all 24 text-query embeddings are identical")
    assert all(t.warnings == () for t in res.tasks if t.task not in ood[:3])


def test_a_degenerate_estimator_is_flagged_on_every_task(tasks):
    flat = small_club()
    with torch.no_grad():
        flat.p_mu[2].weight.zero_()  # μ(x), σ²(x) constant (their biases): every MI estimate is 0
        flat.p_logvar[2].weight.zero_()
    res = analyze_shift(tasks, ID_TASK, flat, n_resamples=0)
    for row in res.tasks:
        assert row.mi_model == pytest.approx(0, abs=1e-9) and row.mi_ref == pytest.approx(0, abs=1e-9)
        assert _warned(res, row.task, "the estimator's μ(x) is constant")
        assert _warned(res, row.task, "EMI is 0 on every task")
    saturated = small_club()
    with torch.no_grad():
        saturated.p_logvar[2].bias.fill_(50.0)  # log σ² pinned at its bound +1 everywhere
    res = analyze_shift(tasks, ID_TASK, saturated, n_resamples=0)
    assert all(_warned(res, t.task, "log σ²(x) sits at its upper bound") for t in res.tasks)
    with torch.no_grad():
        saturated.p_logvar[2].bias.fill_(-50.0)  # at the lower bound: the normal state of a good fit
    res = analyze_shift(tasks, ID_TASK, saturated, n_resamples=0)
    assert not any(_warned(res, t.task, "log σ²(x)") for t in res.tasks)


def test_empty_and_blank_responses_are_counted_per_task():
    from lmms_emi.pipeline.shift import response_warnings

    def rows(task, answers):
        return [Sample(task, i, None, "q", a, "ref") for i, a in enumerate(answers)]

    notes = response_warnings(
        {"a": rows("a", ["", " \n", "x", "y"]), "b": rows("b", ["", "\t"]), "c": rows("c", ["x", "y"])}
    )
    assert notes == {
        "a": ["2 of 4 responses are empty or whitespace"],
        "b": ["all 2 responses are empty or whitespace: EMI measures nothing of the model"],
    }
