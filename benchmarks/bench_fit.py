"""The run's CLUB fit: the fast fit (closed-form linear-Gaussian start + short full-batch refinement, the
default) and today's early-stopping fit (AdamW, batch 1,024, held-out early stopping), each against the
paper's fixed recipe (5,000 steps x batch 1,024), in one process, on the same pooled pairs.

Data: the embeddings of a run (``emi_embeddings.safetensors``, written by every ``score`` / ``analyze`` /
``eval`` run), or by default the offline demo: ``lmms-emi demo-data`` (all 35 synthetic scenarios) into a
temp folder, then ``lmms-emi score --encoders offline`` to embed it (the embedding cache lives there too).

It reports, per recipe (``paper`` = fixed 5,000 steps, ``early`` = today's early stopping, ``fast``):

* held-out log-likelihood: the pooled pairs are split (seeded) into 80 % train and 20 % test; every recipe
  fits on the train part (early stopping and the fast fit split it again internally) and is scored on the
  test part, which none saw. The relative gap is (LL of the reference − LL) / |LL of the reference|
  (positive: worse than the reference), against ``paper`` and against ``early``;
* EMI per task: every recipe fits on all pooled pairs, as a run does (:func:`fit_pooled_estimator`); each
  task's EMI of one recipe must lie inside the other's bootstrap interval and vice versa (``--bootstrap``
  resamples), for ``fast`` vs ``paper``, ``fast`` vs ``early`` and ``early`` vs ``paper``;
* wall time of each fit (on all pooled pairs, as a run does) and its ratio to the paper recipe's.

Times depend on the threads torch uses: run with ``OMP_NUM_THREADS`` set (1 or 2) and nothing else running.

Usage::

    python benchmarks/bench_fit.py                                   # demo data in a temp folder
    python benchmarks/bench_fit.py --embeddings RUN/emi_embeddings.safetensors --json out.json
    python benchmarks/bench_fit.py --recipes early,fast              # skip the 5,000-step recipe
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

# recipe -> (CLUB.fit method, patience)
RECIPES: dict[str, tuple[str, int | None]] = {
    "paper": ("paper", None),
    "early": ("paper", DEFAULT_PATIENCE),
    "fast": ("fast", DEFAULT_PATIENCE),
}
PAIRS = (("fast", "paper"), ("fast", "early"), ("early", "paper"))


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
            "--estimator-fit",
            "fast",
            "--bootstrap",
            "0",
            "--output-path",
            str(out),
            "-q",
        )
    return max(out.glob("*emi_embeddings.safetensors"))  # report files may carry a timestamp prefix


def _summary(club: CLUB) -> dict[str, Any]:
    info = club.fit_info_
    assert info is not None
    hyper = info.hyperparameters
    stop = hyper.get("early_stopping") or hyper.get("fast_fit") or {}
    return {"steps_run": info.steps_run, "best_step": stop.get("best_step")}


def _emis(ordered: dict[str, Any], plan: Any, club: CLUB, *, bootstrap: int, seed: int) -> dict[str, Any]:
    results = {}
    for id_task, tasks in plan.groups.values():
        group = {k: ordered[k] for k in tasks}
        analysis = analyze_shift(group, id_task, club, n_resamples=bootstrap, seed=seed)
        results.update({r.task: r for r in analysis.tasks})
    for task in plan.singles:
        analysis = analyze_shift({task: ordered[task]}, task, club, n_resamples=bootstrap, seed=seed)
        results.update({r.task: r for r in analysis.tasks})
    return results


def bench(embeddings_file: Path, *, seed: int, bootstrap: int, recipes: list[str]) -> dict[str, Any]:
    embeddings, _spec = load_embeddings(embeddings_file)
    plan = plan_run(list(embeddings))
    ordered = {t: embeddings[t] for t in plan.order}
    x, y = pooled_pairs(ordered)
    out: dict[str, Any] = {
        "pairs": int(x.shape[0]),
        "dim": [int(x.shape[1]), int(y.shape[1])],
        "torch_threads": torch.get_num_threads(),
        "split": {},
        "run": {},
        "tasks": {},
    }

    # held-out log-likelihood on a test split no recipe trains on
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    n_test = x.shape[0] // 5
    test, train = order[:n_test], order[n_test:]
    for recipe in recipes:
        method, patience = RECIPES[recipe]
        t = time.perf_counter()
        club = CLUB(x.shape[1], y.shape[1]).fit(
            x[train], y[train], method=method, seed=seed, patience=patience, progress=False
        )
        seconds = time.perf_counter() - t
        with torch.no_grad():
            ll = float(club.log_likelihood(x[test], y[test]))
        out["split"][recipe] = {"test_log_likelihood": ll, "seconds": seconds, **_summary(club)}
    for a, b in PAIRS:
        if a in recipes and b in recipes:
            ref = out["split"][b]["test_log_likelihood"]
            gap = (ref - out["split"][a]["test_log_likelihood"]) / abs(ref)
            out[f"test_ll_rel_gap_{a}_vs_{b}"] = gap

    # EMI per task, each recipe fitted on all pooled pairs as a run does
    analyses = {}
    for recipe in recipes:
        method, patience = RECIPES[recipe]
        t = time.perf_counter()
        club = fit_pooled_estimator(ordered, seed=seed, patience=patience, progress=False, method=method)
        seconds = time.perf_counter() - t
        out["run"][recipe] = {"seconds": seconds, **_summary(club)}
        analyses[recipe] = _emis(ordered, plan, club, bootstrap=bootstrap, seed=seed)
    for task in analyses[recipes[0]]:
        out["tasks"][task] = {r: [analyses[r][task].emi, analyses[r][task].emi_ci] for r in recipes}
    for a, b in PAIRS:
        if a not in recipes or b not in recipes:
            continue
        inside = []
        for task, ra in analyses[a].items():
            rb = analyses[b][task]
            inside.append(
                all(
                    p.emi_ci is not None
                    and p.emi is not None
                    and q.emi is not None
                    and p.emi_ci[0] <= q.emi <= p.emi_ci[1]
                    for p, q in ((ra, rb), (rb, ra))
                )
            )
        out[f"tasks_within_intervals_{a}_vs_{b}"] = f"{sum(inside)}/{len(inside)}"
        out[f"time_ratio_{a}_over_{b}"] = out["run"][a]["seconds"] / out["run"][b]["seconds"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", type=Path, help="a run's emi_embeddings.safetensors (default: the demo)")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the demo data and its embeddings here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--json", type=Path, help="write the numbers here")
    ns = p.parse_args()
    recipes = [r for r in RECIPES if r in ns.recipes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        path = ns.embeddings or demo_embeddings(ns.workdir or Path(tmp))
        out = bench(path, seed=ns.seed, bootstrap=ns.bootstrap, recipes=recipes)
    print(f"pairs: {out['pairs']}, dims: {out['dim']}, torch threads: {out['torch_threads']}")
    print(f"{'recipe':8} {'fit s (run)':>12} {'steps':>6} {'test LL':>12} {'fit s (split)':>14}")
    for r in recipes:
        run, split = out["run"][r], out["split"][r]
        print(
            f"{r:8} {run['seconds']:12.2f} {run['steps_run']:6d} {split['test_log_likelihood']:12.4f} "
            f"{split['seconds']:14.2f}"
        )
    for a, b in PAIRS:
        if f"time_ratio_{a}_over_{b}" in out:
            print(
                f"{a} vs {b}: time ratio {out[f'time_ratio_{a}_over_{b}']:.4f}, test LL relative gap "
                f"{out[f'test_ll_rel_gap_{a}_vs_{b}']:+.2e}, tasks whose EMI lies in the other's interval "
                f"(both ways) {out[f'tasks_within_intervals_{a}_vs_{b}']}"
            )
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
