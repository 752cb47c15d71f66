"""Known-MI validation of every MI estimator (issue 21, item 3).

Distributions with closed-form mutual information, after the benchmark of Czyż et al. (NeurIPS 2023,
"Beyond Normal"):

- ``gaussian``: x ~ N(0, I_d), y = ρx + √(1 − ρ²)ε (ε ~ N(0, I_d) independent), ρ² = 1 − exp(−2I/d), so
  I(X; Y) = −d/2 · log(1 − ρ²) = I exactly;
- ``halfcube``: the same pairs through the half-cube map t ↦ t·√|t| applied to every coordinate of x and of y
  (a diffeomorphism of each variable, so I(X; Y) is unchanged while the marginals are no longer Gaussian).

Each estimator is fitted as a run fits it (:func:`lmms_emi.pipeline.estimator.fit_pooled_estimator`'s
settings: CLUB by the fast fit, the critic estimators by Adam; all with held-out early stopping, patience 5,
at most ``--steps`` steps, the given seed) on N pairs and evaluated on the same N pairs (the pipeline's
protocol: EMI is estimated on the pairs the estimator was fitted on) and on N fresh pairs of the same
distribution. For CLUB the reference is also its value with the true conditional q(y|x) = N(ρx, (1 − ρ²)I):
E log q(y|x) − E_x E_y' log q(y'|x) = d·ρ²/(1 − ρ²) ("true-q", Gaussian case only).

Prints, per case × d × true MI × estimator over the seeds: mean bias (estimate − truth) and its standard
deviation, on the fitted rows and on fresh rows, CLUB's bias against its true-q value, the mean fit time and
steps run. Results are appended to a JSON file as they come (``--out``; a rerun skips cells already there),
and the table is printed as Markdown. Run:

    python benchmarks/bench_mi.py --quick                   # smoke: d = 8, one level, one seed, 200 steps
    python benchmarks/bench_mi.py --dims 8 64 --seeds 5      # a subset
    python benchmarks/bench_mi.py                            # everything (slow on a CPU)
    python benchmarks/bench_mi.py --table-only               # the table of every row in --out
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.estimators.families import MI_ESTIMATORS

CASES = ("gaussian", "halfcube")
PATIENCE = 5  # the pipeline's default (lmms_emi.pipeline.estimator.DEFAULT_PATIENCE)


def sample(case: str, d: int, mi: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n pairs of ``case`` with I(X; Y) = ``mi`` nats, and ρ."""
    rho = math.sqrt(1 - math.exp(-2 * mi / d))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=gen)
    if case == "halfcube":
        x, y = x * x.abs().sqrt(), y * y.abs().sqrt()
    return x, y, rho


def fit(name: str, x: torch.Tensor, y: torch.Tensor, *, steps: int, seed: int) -> Any:
    if name == "club":
        return CLUB(x.shape[1], y.shape[1], 500).fit(
            x, y, method="fast", steps=steps, seed=seed, patience=PATIENCE, progress=False
        )
    return CriticMI(x.shape[1], y.shape[1], bound=name).fit(
        x, y, steps=steps, seed=seed, patience=PATIENCE, progress=False
    )


def run_cell(case: str, d: int, mi: float, name: str, seed: int, n: int, steps: int) -> dict[str, Any]:
    x, y, rho = sample(case, d, mi, n, seed)
    fresh_x, fresh_y, _ = sample(case, d, mi, n, seed + 10_000)
    torch.manual_seed(seed)
    started = time.perf_counter()
    est = fit(name, x, y, steps=steps, seed=seed)
    seconds = time.perf_counter() - started
    return {
        "case": case,
        "d": d,
        "mi": mi,
        "estimator": name,
        "seed": seed,
        "n": n,
        "steps_cap": steps,
        "estimate": est.mutual_information(x, y),
        "estimate_fresh": est.mutual_information(fresh_x, fresh_y),
        "true_q": d * rho**2 / (1 - rho**2) if case == "gaussian" else None,
        "fit_seconds": seconds,
        "steps_run": est.fit_info_.steps_run,
    }


def _key(row: dict[str, Any]) -> tuple:
    return (row["case"], row["d"], row["mi"], row["estimator"], row["seed"], row["n"], row["steps_cap"])


def table(rows: Iterable[dict[str, Any]]) -> str:
    """The Markdown table: one line per case × d × MI × estimator."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["d"], r["mi"], r["estimator"]), []).append(r)
    order = {name: i for i, name in enumerate(MI_ESTIMATORS)}
    lines = [
        "| case | d | true MI | estimator | seeds | bias (fitted rows) | bias (fresh rows) | CLUB − true-q | "
        "fit s | steps |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):+.3f} ± {sd:.3f}"

    for (case, d, mi, name), rs in sorted(groups.items(), key=lambda kv: (*kv[0][:3], order[kv[0][3]])):
        bias = [r["estimate"] - mi for r in rs]
        fresh = [r["estimate_fresh"] - mi for r in rs]
        true_q = (
            spread([r["estimate"] - r["true_q"] for r in rs])
            if name == "club" and rs[0]["true_q"] is not None
            else ""
        )
        fit_s = statistics.fmean(r["fit_seconds"] for r in rs)
        steps = statistics.fmean(r["steps_run"] for r in rs)
        lines.append(
            f"| {case} | {d} | {mi:g} | {name} | {len(rs)} | {spread(bias)} | {spread(fresh)} | {true_q} | "
            f"{fit_s:.1f} | {steps:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: d = 8, I = 1, one seed, 200 steps")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--dims", nargs="+", type=int, default=[8, 64, 768])
    parser.add_argument("--mi", nargs="+", type=float, default=[0.5, 2.0, 5.0], help="true MI levels, nats")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=5000, help="most steps of a fit (early stopping)")
    parser.add_argument("--estimators", nargs="+", default=list(MI_ESTIMATORS), choices=list(MI_ESTIMATORS))
    parser.add_argument(
        "--halfcube-dims", nargs="+", type=int, default=None, help="dims of the half-cube case"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench_mi.json"), help="results, appended as they come"
    )
    parser.add_argument("--table-only", action="store_true", help="print the table of every row in --out")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads(args.out.read_text())))
        return
    if args.quick:
        args.dims, args.mi, args.seeds, args.n, args.steps = [8], [1.0], 1, 1000, 200
    rows: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {_key(r) for r in rows}
    cells = [
        (case, d, mi, name, seed)
        for case in args.cases
        for d in (args.halfcube_dims or args.dims if case == "halfcube" else args.dims)
        for mi in args.mi
        for seed in range(args.seeds)
        for name in args.estimators
    ]
    started = time.perf_counter()
    for i, (case, d, mi, name, seed) in enumerate(cells):
        key = (case, d, mi, name, seed, args.n, args.steps)
        if key in done:
            continue
        row = run_cell(case, d, mi, name, seed, args.n, args.steps)
        rows.append(row)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.out)
        print(
            f"[{i + 1}/{len(cells)} {time.perf_counter() - started:.0f}s] {case} d={d} I={mi:g} {name} "
            f"seed={seed}: {row['estimate']:.3f} (fresh {row['estimate_fresh']:.3f}) "
            f"in {row['fit_seconds']:.1f}s",
            flush=True,
        )
    wanted = {(c, d, mi, name, s, args.n, args.steps) for c, d, mi, name, s in cells}
    print(table([r for r in rows if _key(r) in wanted]))


if __name__ == "__main__":
    main()
