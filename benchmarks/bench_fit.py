"""The run's CLUB fit: early stopping on a held-out split (the default) against the paper's fixed recipe
(5,000 steps x batch 1,024), in one process, on the same pooled pairs.

Data: the embeddings of a run (``emi_embeddings.safetensors``, written by every ``score`` / ``analyze`` /
``eval`` run), or by default the offline demo: ``lmms-emi demo-data`` into a temp folder, then
``lmms-emi score --encoders offline`` to embed it (the embedding cache lives in that folder too).

It reports:

* held-out log-likelihood: the pooled pairs are split (seeded) into 80 % train and 20 % test; both recipes
  fit on the train part (early stopping splits it again internally) and are scored on the test part, which
  neither saw. The relative gap is against |LL of the fixed recipe|;
* EMI per task: both recipes fit on all pooled pairs, as a run does (:func:`fit_pooled_estimator`); each
  task's EMI of one recipe must lie inside the other's bootstrap interval (``--bootstrap`` resamples);
* wall time of each fit and their ratio (fixed / early stopping), steps run, best step.

Usage::

    python benchmarks/bench_fit.py                                   # demo data in a temp folder
    python benchmarks/bench_fit.py --embeddings RUN/emi_embeddings.safetensors --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lmms_emi.embed.store import load_embeddings
from lmms_emi.estimators.club import CLUB
from lmms_emi.pipeline.estimator import DEFAULT_PATIENCE, fit_pooled_estimator, pooled_pairs
from lmms_emi.pipeline.run import plan_run
from lmms_emi.pipeline.shift import analyze_shift

RECIPES: dict[str, int | None] = {"fixed": None, "early": DEFAULT_PATIENCE}


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmms_emi.cli", *args], check=True)


def demo_embeddings(workdir: Path) -> Path:
    """Build the demo data and embed it with the offline encoders; the run's embeddings file."""
    out = workdir / "score"
    if not list(out.glob("*emi_embeddings.safetensors")):
        _cli("demo-data", str(workdir / "demo"))
        _cli(
            "score",
            "--dataset",
            str(workdir / "demo" / "dataset"),
            "--responses",
            str(workdir / "demo" / "responses"),
            "--encoders",
            "offline",
            "--emi-cache",
            str(workdir / "cache"),
            "--estimator",
            "fit",
            "--estimator-steps",
            "1",
            "--bootstrap",
            "0",
            "--output-path",
            str(out),
            "-q",
        )
    return max(out.glob("*emi_embeddings.safetensors"))  # report files may carry a timestamp prefix


def _fit(x: torch.Tensor, y: torch.Tensor, patience: int | None, seed: int) -> tuple[CLUB, float]:
    t = time.perf_counter()
    club = CLUB(x.shape[1], y.shape[1]).fit(x, y, seed=seed, patience=patience, progress=False)
    return club, time.perf_counter() - t


def bench(embeddings_file: Path, *, seed: int, bootstrap: int) -> dict[str, Any]:
    embeddings, _spec = load_embeddings(embeddings_file)
    plan = plan_run(list(embeddings))
    ordered = {t: embeddings[t] for t in plan.order}
    x, y = pooled_pairs(ordered)
    out: dict[str, Any] = {"pairs": int(x.shape[0]), "dim": [int(x.shape[1]), int(y.shape[1])], "tasks": {}}

    # held-out log-likelihood on a test split neither recipe trains on
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    n_test = x.shape[0] // 5
    test, train = order[:n_test], order[n_test:]
    for recipe, patience in RECIPES.items():
        club, seconds = _fit(x[train], y[train], patience, seed)
        with torch.no_grad():
            ll = float(club.log_likelihood(x[test], y[test]))
        info = club.fit_info_
        early = info.hyperparameters.get("early_stopping", {})
        out[f"{recipe}_split"] = {
            "test_log_likelihood": ll,
            "seconds": seconds,
            "steps_run": info.steps_run,
            "best_step": early.get("best_step"),
        }
    fixed_ll, early_ll = out["fixed_split"]["test_log_likelihood"], out["early_split"]["test_log_likelihood"]
    out["test_ll_rel_gap"] = (fixed_ll - early_ll) / abs(fixed_ll)

    # EMI per task, each recipe fitted on all pooled pairs as a run does
    analyses = {}
    for recipe, patience in RECIPES.items():
        t = time.perf_counter()
        club = fit_pooled_estimator(ordered, seed=seed, patience=patience, progress=False)
        seconds = time.perf_counter() - t
        out[f"{recipe}_run"] = {"seconds": seconds, "steps_run": club.fit_info_.steps_run}
        results = {}
        for id_task, tasks in plan.groups.values():
            analysis = analyze_shift(
                {k: ordered[k] for k in tasks}, id_task, club, n_resamples=bootstrap, seed=seed
            )
            results.update({r.task: r for r in analysis.tasks})
        for task in plan.singles:
            results.update({r.task: r for r in analyze_shift({task: ordered[task]}, task, club).tasks})
        analyses[recipe] = results
    inside = 0
    for task, fixed in analyses["fixed"].items():
        early = analyses["early"][task]
        ok = all(
            a.emi_ci is not None and a.emi_ci[0] <= b.emi <= a.emi_ci[1]
            for a, b in ((fixed, early), (early, fixed))
        )
        inside += ok
        out["tasks"][task] = {
            "fixed": [fixed.emi, fixed.emi_ci],
            "early": [early.emi, early.emi_ci],
            "ok": ok,
        }
    out["tasks_within_intervals"] = f"{inside}/{len(analyses['fixed'])}"
    out["time_ratio_fixed_over_early"] = out["fixed_run"]["seconds"] / out["early_run"]["seconds"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", type=Path, help="a run's emi_embeddings.safetensors (default: the demo)")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the demo data and its embeddings here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", type=Path, help="write the numbers here")
    ns = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        path = ns.embeddings or demo_embeddings(ns.workdir or Path(tmp))
        out = bench(path, seed=ns.seed, bootstrap=ns.bootstrap)
    for key in ("pairs", "dim", "fixed_split", "early_split", "test_ll_rel_gap", "fixed_run", "early_run"):
        print(f"{key}: {out[key]}")
    print(f"tasks whose EMI lies in the other recipe's interval: {out['tasks_within_intervals']}")
    print(f"time ratio (fixed / early stopping, full fit): {out['time_ratio_fixed_over_early']:.2f}")
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
