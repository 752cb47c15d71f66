"""``lmms-emi compare RUN_A RUN_B``: a paired bootstrap of two runs' EMI over the questions both answered,
on runs the pipeline scored from synthetic embeddings (built as in ``test_leaderboard``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_leaderboard import SPEC, fit_estimator, synthetic_models, write_run

from lmms_emi.cli import main
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import UsageError
from lmms_emi.leaderboard import build_leaderboard
from lmms_emi.leaderboard.paired import compare_runs, match_samples


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model, its answers shuffled across questions, a copy of the demo run, all scored with one
    frozen estimator; and the demo and shuffled models each with their own fitted estimator."""
    root = tmp_path_factory.mktemp("compare")
    models = synthetic_models()
    pooled = {f"{m}:{t}": e for m, tasks in models.items() for t, e in tasks.items()}
    club = fit_estimator(pooled)
    frozen = club.save(root / "frozen.safetensors", club.make_manifest(SPEC))
    out = {"frozen": frozen}
    for name, run_id in (("demo", "20260101_000000"), ("shuffled", "20260101_000001")):
        out[name] = write_run(root / name, name, run_id, models[name], None, frozen=frozen)
        own = fit_estimator(models[name], seed=len(out))
        out[f"{name}_fitted"] = write_run(root / f"{name}_fitted", name, run_id, models[name], own)
    out["demo_copy"] = write_run(
        root / "demo_copy", "demo", "20260101_000002", models["demo"], None, frozen=frozen
    )
    # the demo model's answers on a subset of the questions, in another order (e.g. another --limit)
    keep = torch.randperm(30, generator=torch.Generator().manual_seed(3))[:24]
    subset = {t: e.subset(keep) for t, e in models["demo"].items()}
    out["demo_subset"] = write_run(root / "demo_subset", "demo-subset", "20260101_000003", subset, None,
                                   frozen=frozen)  # fmt: skip
    return out


def _by(result: Any, quantity: str) -> Any:
    (d,) = [d for d in result.differences if d.quantity == quantity]
    return d


def test_a_real_difference_is_significant_and_deterministic(runs: dict[str, Path]) -> None:
    """Demo vs its answers shuffled across questions: A − B > 0 on the ID task and under shift, an interval
    above 0, significant; the point values are the runs' own EMI; the same seed gives the same numbers."""
    result = compare_runs(runs["demo"], runs["shuffled"], n_resamples=300, seed=0)
    board = {r["model"]: r for r in build_leaderboard([runs["demo"], runs["shuffled"]]).rows}
    id_emi, shifted, emid = (_by(result, q) for q in ("ID EMI", "EMI under shift", "mean EMID"))
    for d in (id_emi, shifted):
        assert d.diff > 0 and d.ci is not None and d.ci[0] > 0 and d.significant is True
        assert d.p_value is not None and d.p_value < 0.05
    assert id_emi.a == pytest.approx(board["demo"]["emi_id"], abs=1e-9)
    assert id_emi.b == pytest.approx(board["shuffled"]["emi_id"], abs=1e-9)
    assert shifted.a == pytest.approx(board["demo"]["emi_ood_mean"], abs=1e-9)
    assert emid.a == pytest.approx(board["demo"]["emid_mean"], abs=1e-9)
    assert id_emi.n_questions == 30 and id_emi.a_ahead is not None and id_emi.a_ahead > 15
    again = compare_runs(runs["demo"], runs["shuffled"], n_resamples=300, seed=0)
    assert again.to_json() == result.to_json()
    other_seed = compare_runs(runs["demo"], runs["shuffled"], n_resamples=300, seed=1)
    assert _by(other_seed, "ID EMI").ci != id_emi.ci and _by(other_seed, "ID EMI").diff == id_emi.diff


def test_a_model_against_itself_is_no_difference(runs: dict[str, Path]) -> None:
    result = compare_runs(runs["demo"], runs["demo_copy"], n_resamples=100)
    for d in result.differences:
        assert d.diff == 0.0 and d.ci == (0.0, 0.0) and d.significant is False and d.p_value == 1.0


def test_questions_are_matched_by_content_when_the_rows_differ(runs: dict[str, Path]) -> None:
    """B answered 24 of A's 30 questions, in another order: the pairs are the same questions, so the
    difference is exactly 0 (the same model), over 24 questions, with a note."""
    result = compare_runs(runs["demo"], runs["demo_subset"], n_resamples=100)
    id_emi = _by(result, "ID EMI")
    assert id_emi.n_questions == 24 and id_emi.diff == pytest.approx(0.0, abs=1e-12)
    assert any("24 questions matched by question content (A has 30, B 24)" in n for n in result.notes)
    gen = torch.Generator().manual_seed(0)
    a = TaskEmbeddings(*(torch.randn(6, 4, generator=gen) for _ in range(4)))
    order = torch.tensor([5, 0, 3])
    ia, ib, how = match_samples(a, a.subset(order))
    assert (how, [int(order[j]) for j in ib]) == ("by question content", ia)


def test_estimators_that_differ_are_refused_naming_them_unless_one_is_given(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError) as info:
        compare_runs(runs["demo_fitted"], runs["shuffled_fitted"], n_resamples=50)
    message = str(info.value)
    assert "estimators differ" in message and "fitted on its run" in message and "--estimator" in message
    assert str(runs["demo_fitted"]) in message and str(runs["shuffled_fitted"]) in message
    given = compare_runs(runs["demo_fitted"], runs["shuffled_fitted"], estimator=str(runs["frozen"]),
                         n_resamples=200)  # fmt: skip
    same = compare_runs(runs["demo"], runs["shuffled"], n_resamples=200)
    assert given.to_dict()["differences"] == same.to_dict()["differences"]

    code = main(
        ["compare", str(runs["demo"]), str(runs["shuffled"]), "--bootstrap", "200", "--format", "json"]
    )
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["differences"] == json.loads(same.to_json())["differences"]
    code = main(["compare", str(runs["demo"]), str(runs["shuffled"].parent), "--bootstrap", "200"])
    out, _ = capsys.readouterr()
    assert code == 0 and "| synthetic | ID EMI |" in out and "yes" in out
    code = main(["compare", str(runs["demo_fitted"]), str(runs["shuffled_fitted"])])
    _, err = capsys.readouterr()
    assert code == 2 and "estimators differ" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["compare", "a_results.json", "b_results.json"],
        ["leaderboard", "runs", "--common-estimator", "--output-path", "board"],
    ],
)
def test_rescoring_with_a_critic_estimator_is_refused_in_one_line(args, tmp_path, capsys, monkeypatch):
    """compare and --common-estimator re-score with CLUB only: another --mi-estimator is one line, before
    any run is read."""
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--mi-estimator", "infonce"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--mi-estimator infonce" in line and "CLUB only" in line
