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
    python benchmarks/bench_fit.py --recipes early,fast --seeds 0,1,2  # each fit at 3 seeds: how reproducible
                                                                     # is each recipe, fit against fit?
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


def _split_fit(
    x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor, recipe: str, seed: int
) -> dict[str, Any]:
    """Fit ``recipe`` on the train rows and score the mean log-likelihood of the test rows."""
    method, patience = RECIPES[recipe]
    t = time.perf_counter()
    club = CLUB(x.shape[1], y.shape[1]).fit(
        x[train], y[train], method=method, seed=seed, patience=patience, progress=False
    )
    seconds = time.perf_counter() - t
    with torch.no_grad():
        ll = float(club.log_likelihood(x[test], y[test]))
    return {"test_log_likelihood": ll, "seconds": seconds, **_summary(club)}


def _run_fit(
    ordered: dict[str, Any], plan: Any, recipe: str, *, seed: int, bootstrap: int, bootstrap_seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit ``recipe`` on all pooled pairs as a run does; (its summary with the wall time, EMI per task)."""
    method, patience = RECIPES[recipe]
    t = time.perf_counter()
    club = fit_pooled_estimator(ordered, seed=seed, patience=patience, progress=False, method=method)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, **_summary(club)}, _emis(
        ordered, plan, club, bootstrap=bootstrap, seed=bootstrap_seed
    )


def _in_interval(p: Any, q: Any) -> bool:
    """Whether q's EMI lies inside p's bootstrap interval (False when either is missing)."""
    return (
        p.emi_ci is not None
        and p.emi is not None
        and q.emi is not None
        and p.emi_ci[0] <= q.emi <= p.emi_ci[1]
    )


def _prepare(embeddings_file: Path) -> tuple[dict[str, Any], Any, torch.Tensor, torch.Tensor]:
    embeddings, _spec = load_embeddings(embeddings_file)
    plan = plan_run(list(embeddings))
    ordered = {t: embeddings[t] for t in plan.order}
    x, y = pooled_pairs(ordered)
    return ordered, plan, x, y


def _test_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(test rows, train rows): a seeded 20 % / 80 % split of the pooled pairs that no recipe trains on."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_test = n // 5
    return order[:n_test], order[n_test:]


def bench(embeddings_file: Path, *, seed: int, bootstrap: int, recipes: list[str]) -> dict[str, Any]:
    ordered, plan, x, y = _prepare(embeddings_file)
    out: dict[str, Any] = {
        "pairs": int(x.shape[0]),
        "dim": [int(x.shape[1]), int(y.shape[1])],
        "torch_threads": torch.get_num_threads(),
        "split": {},
        "run": {},
        "tasks": {},
    }

    # held-out log-likelihood on a test split no recipe trains on
    test, train = _test_split(x.shape[0], seed)
    for recipe in recipes:
        out["split"][recipe] = _split_fit(x, y, train, test, recipe, seed)
    for a, b in PAIRS:
        if a in recipes and b in recipes:
            ref = out["split"][b]["test_log_likelihood"]
            gap = (ref - out["split"][a]["test_log_likelihood"]) / abs(ref)
            out[f"test_ll_rel_gap_{a}_vs_{b}"] = gap

    # EMI per task, each recipe fitted on all pooled pairs as a run does
    analyses = {}
    for recipe in recipes:
        out["run"][recipe], analyses[recipe] = _run_fit(
            ordered, plan, recipe, seed=seed, bootstrap=bootstrap, bootstrap_seed=seed
        )
    for task in analyses[recipes[0]]:
        out["tasks"][task] = {r: [analyses[r][task].emi, analyses[r][task].emi_ci] for r in recipes}
    for a, b in PAIRS:
        if a not in recipes or b not in recipes:
            continue
        inside = [
            _in_interval(ra, analyses[b][task]) and _in_interval(analyses[b][task], ra)
            for task, ra in analyses[a].items()
        ]
        out[f"tasks_within_intervals_{a}_vs_{b}"] = f"{sum(inside)}/{len(inside)}"
        out[f"time_ratio_{a}_over_{b}"] = out["run"][a]["seconds"] / out["run"][b]["seconds"]
    return out


def bench_seeds(
    embeddings_file: Path, *, seeds: list[int], seed: int, bootstrap: int, recipes: list[str]
) -> dict[str, Any]:
    """Every recipe fitted at every seed of ``seeds`` (the fit's seed only: the 20 % test split and the
    bootstrap resamples stay those of ``seed``, so fits differ by their own randomness alone). For every pair
    of fits: how many tasks' EMI lie inside the other's interval (one way each, and both ways); per recipe and
    task: the spread of EMI across seeds."""
    ordered, plan, x, y = _prepare(embeddings_file)
    test, train = _test_split(x.shape[0], seed)
    fits: dict[str, dict[str, Any]] = {}
    analyses: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        for s in seeds:
            label = f"{recipe}@{s}"
            split = _split_fit(x, y, train, test, recipe, s)
            run, analyses[label] = _run_fit(
                ordered, plan, recipe, seed=s, bootstrap=bootstrap, bootstrap_seed=seed
            )
            fits[label] = {
                "recipe": recipe,
                "seed": s,
                "test_log_likelihood": split["test_log_likelihood"],
                "split_seconds": split["seconds"],
                "split_steps_run": split["steps_run"],
                "run_seconds": run["seconds"],
                "steps_run": run["steps_run"],
                "best_step": run["best_step"],
            }
            print(
                f"fitted {label}: {run['seconds']:.2f} s (run), test LL {split['test_log_likelihood']:.4f}",
                flush=True,
            )
    labels = list(fits)
    tasks = list(analyses[labels[0]])
    agreement = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            a_in_b = [t for t in tasks if _in_interval(analyses[b][t], analyses[a][t])]
            b_in_a = [t for t in tasks if _in_interval(analyses[a][t], analyses[b][t])]
            both = set(a_in_b) & set(b_in_a)
            agreement.append({
                "a": a, "b": b, "n": len(tasks), "both_ways": len(both), "a_in_b": len(a_in_b),
                "b_in_a": len(b_in_a), "missed": [t for t in tasks if t not in both],
            })  # fmt: skip
    spread: dict[str, dict[str, dict[str, float]]] = {}
    for recipe in recipes:
        spread[recipe] = {}
        for t in tasks:
            values = torch.tensor([analyses[f"{recipe}@{s}"][t].emi for s in seeds], dtype=torch.float64)
            cis = [analyses[f"{recipe}@{s}"][t].emi_ci for s in seeds]
            spread[recipe][t] = {
                "min": float(values.min()),
                "max": float(values.max()),
                "range": float(values.max() - values.min()),
                "std": float(values.std(correction=1)) if len(seeds) > 1 else 0.0,
                "mean": float(values.mean()),
                "mean_ci_width": sum(c[1] - c[0] for c in cis) / len(cis) if all(cis) else float("nan"),
            }
    return {
        "pairs": int(x.shape[0]),
        "dim": [int(x.shape[1]), int(y.shape[1])],
        "torch_threads": torch.get_num_threads(),
        "seeds": seeds,
        "split_and_bootstrap_seed": seed,
        "fits": fits,
        "tasks": {t: {lab: [analyses[lab][t].emi, analyses[lab][t].emi_ci] for lab in labels} for t in tasks},
        "agreement": agreement,
        "spread": spread,
    }


def _print_seeds(out: dict[str, Any], recipes: list[str]) -> None:
    print(
        f"pairs: {out['pairs']}, dims: {out['dim']}, torch threads: {out['torch_threads']}, fit seeds "
        f"{out['seeds']} (test split and bootstrap seed {out['split_and_bootstrap_seed']})"
    )
    print(f"{'fit':10} {'fit s (run)':>12} {'steps':>6} {'best':>6} {'test LL':>12} {'fit s (split)':>14}")
    for label, f in out["fits"].items():
        print(
            f"{label:10} {f['run_seconds']:12.2f} {f['steps_run']:6d} {f['best_step']!s:>6} "
            f"{f['test_log_likelihood']:12.4f} {f['split_seconds']:14.2f}"
        )
    print(
        "tasks whose EMI lies in the other fit's interval: both ways (a in b's, b in a's) / n; missed tasks"
    )
    for g in out["agreement"]:
        missed = ", ".join(g["missed"]) or "-"
        print(
            f"  {g['a']:>8} vs {g['b']:<8} {g['both_ways']:2d} ({g['a_in_b']}, {g['b_in_a']}) / {g['n']}"
            f"   {missed}"
        )
    print(
        "EMI spread across seeds (max - min), over tasks: median, max (task); median bootstrap interval width"
    )
    for recipe in recipes:
        rows = out["spread"][recipe]
        ranges = sorted(r["range"] for r in rows.values())
        worst = max(rows, key=lambda t: rows[t]["range"])
        widths = sorted(r["mean_ci_width"] for r in rows.values())
        print(
            f"  {recipe:8} median {ranges[len(ranges) // 2]:.4f}, max {ranges[-1]:.4f} ({worst}); "
            f"interval width median {widths[len(widths) // 2]:.4f}"
        )
    missed = sorted({t for g in out["agreement"] for t in g["missed"]})
    if missed:
        print("missed tasks: EMI [interval] per fit")
    for t in missed:
        print(f"  {t}")
        for label, (emi, ci) in out["tasks"][t].items():
            print(f"    {label:10} {emi:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", type=Path, help="a run's emi_embeddings.safetensors (default: the demo)")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the demo data and its embeddings here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds",
        help="comma-separated fit seeds (e.g. 0,1,2): fit every recipe at each, compare every pair of fits "
        "(the test split and the bootstrap stay those of --seed)",
    )
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--json", type=Path, help="write the numbers here")
    ns = p.parse_args()
    recipes = [r for r in RECIPES if r in ns.recipes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        path = ns.embeddings or demo_embeddings(ns.workdir or Path(tmp))
        if ns.seeds:
            seeds = [int(v) for v in ns.seeds.split(",")]
            out = bench_seeds(path, seeds=seeds, seed=ns.seed, bootstrap=ns.bootstrap, recipes=recipes)
            _print_seeds(out, recipes)
            if ns.json:
                ns.json.write_text(json.dumps(out, indent=2, default=str))
            return 0
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
