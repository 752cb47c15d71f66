"""Benchmark of the estimator core, each fast path against the naive path in the same run.

Prints:
1. CLUB estimate: time and extra peak memory for N in {1e3, 1e4, 1e5} at d = 768, closed form O(N·d)
   vs the pairwise N×N×d tensor of the reference implementation (only where that fits in memory).
2. CLUB training: 5000 steps of batch 1024 at d = 768 (the paper reports 663 s), and what the plateau
   stop saves (steps, seconds, and the change in the estimate).
3. RJSD bounds at d = 768 for 34 shifted tasks against one ID task: three bound forms per task by separate
   calls vs one shift_divergences pass that computes the ID task's spectra once.
4. Bootstrap (B = 1000, n = 90): vectorised reweighting vs one estimate per replicate.
5. Bootstrap peak memory and time (B = 1000, n = 20,000, d = 768): the weighted closed form in row chunks
   (what bootstrap_emi runs) vs the earlier full-copy form (float64 copies of μ-derived a, b and of y, y² for
   both targets, kept inline below for comparison); both through the same scipy percentile bootstrap.

Each memory figure comes from a fresh subprocess (ru_maxrss after − RSS before). Run:
    python benchmarks/bench_estimators.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

from lmms_emi.emi import (
    TaskEmbeddings,
    _conditionals,
    _percentile_bootstrap,
    _resampled_emi,
    bootstrap_emi,
    effective_mutual_information,
    emid_upper_bound,
    partial_upper_bound,
    shift_divergences,
)
from lmms_emi.estimators.club import CLUB
from lmms_emi.estimators.rjsd import rjsd

D = 768


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _unit(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def _seeded_club(seed: int = 0) -> CLUB:
    """A paper-sized CLUB with seeded random weights, marked fitted as a loaded checkpoint is."""
    club = CLUB(D, D, 500)
    club.reset_parameters(seed)
    club.load_state_dict(club.state_dict())
    return club.eval()


def naive_club_mi(club: CLUB, x: torch.Tensor, y: torch.Tensor) -> float:
    """The reference implementation's pairwise form: materialises an (N, N, d) tensor."""
    with torch.no_grad():
        mu, logvar = club(x)
        positive = -((mu - y) ** 2) / 2.0 / logvar.exp()
        negative = -((y.unsqueeze(0) - mu.unsqueeze(1)) ** 2).mean(dim=1) / 2.0 / logvar.exp()
        return float((positive.sum(-1) - negative.sum(-1)).mean())


def _estimate_worker(n: int, naive: bool, queue: mp.Queue) -> None:
    torch.set_num_threads(2)
    club = _seeded_club()
    x, y = _unit(n, 0), _unit(n, 1)
    before = _rss_mib()
    start = time.perf_counter()
    value = naive_club_mi(club, x, y) if naive else club.mutual_information(x, y)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"n": n, "naive": naive, "seconds": seconds, "extra_peak_mib": peak - before, "value": value})


def _in_subprocess(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_estimate(sizes: list[int], naive_max: int) -> None:
    print("\n## CLUB estimate, d = 768 (closed form vs pairwise N×N×d)")
    header = ("N", "closed s", "closed MiB", "naive s", "naive MiB", "speed-up")
    print("{:>8} {:>10} {:>11} {:>10} {:>10} {:>9}  |Δ|".format(*header))
    for n in sizes:
        fast = _in_subprocess(_estimate_worker, n, False)
        if n <= naive_max:
            slow = _in_subprocess(_estimate_worker, n, True)
            print(
                f"{n:>8} {fast['seconds']:>10.4f} {fast['extra_peak_mib']:>11.1f} {slow['seconds']:>10.4f} "
                f"{slow['extra_peak_mib']:>10.1f} {slow['seconds'] / fast['seconds']:>8.0f}x  "
                f"{abs(fast['value'] - slow['value']):.1e} (naive sums in float32)"
            )
        else:
            need_gib = n * n * D * 4 / 2**30
            print(
                f"{n:>8} {fast['seconds']:>10.4f} {fast['extra_peak_mib']:>11.1f} "
                f"{'(needs ' + format(need_gib, '.0f') + ' GiB)':>22}"
            )


def _training_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and responses with a real dependence: y = normalise(A x + noise)."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, D, generator=g), dim=1)
    a = torch.randn(D, D, generator=g) / D**0.5
    y = F.normalize(x @ a + 0.05 * torch.randn(n, D, generator=g), dim=1)
    return x, y


def bench_training(steps: int, n: int) -> None:
    print(f"\n## CLUB training, d = 768, batch 1024, {n} pairs")
    x, y = _training_data(n)
    start = time.perf_counter()
    full = CLUB(D, D, 500).fit(x, y, steps=steps, batch_size=1024, seed=0, progress=False)
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    early = CLUB(D, D, 500).fit(x, y, steps=steps, batch_size=1024, seed=0, patience=5, progress=False)
    early_s = time.perf_counter() - start
    mi_full, mi_early = full.mutual_information(x, y), early.mutual_information(x, y)
    per_step = 1000 * full_s / steps
    print(f"{steps} steps: {full_s:.1f} s ({per_step:.1f} ms/step; paper: 663 s), Î = {mi_full:.4f}")
    print(
        f"plateau stop (patience 5 x 100 steps): {early.fit_info_.steps_run} steps, {early_s:.1f} s "
        f"({full_s / early_s:.1f}x less time), Î = {mi_early:.4f} "
        f"(Δ = {mi_early - mi_full:+.4f}, {100 * abs(mi_early - mi_full) / abs(mi_full):.1f}%)"
    )


def bench_rjsd(n: int, pairs: int) -> None:
    print(f"\n## RJSD bounds, d = 768, n = {n} per task, {pairs} shifted tasks vs one ID task")
    tasks = [TaskEmbeddings(*(_unit(n, 4 * seed + k) for k in range(4))) for seed in range(pairs + 1)]
    start = time.perf_counter()
    rjsd(tasks[0].z_v, tasks[1].z_v)
    one = time.perf_counter() - start
    start = time.perf_counter()
    naive = [
        (emid_upper_bound(tasks[0], q), emid_upper_bound(tasks[0], q, 2.0), partial_upper_bound(tasks[0], q))
        for q in tasks[1:]
    ]
    naive_s = time.perf_counter() - start
    start = time.perf_counter()
    terms = shift_divergences(tasks[0], {str(i): q for i, q in enumerate(tasks[1:])})
    shared = [(t.bound(), t.bound(2.0), t.partial()) for t in terms.values()]
    shared_s = time.perf_counter() - start
    for got, want in zip(shared, naive, strict=True):
        assert np.allclose([g.value for g in got], [w.value for w in want])
    print(
        f"one RJSD: {1000 * one:.0f} ms; three bound forms per task: {naive_s:.2f} s calling each bound, "
        f"{shared_s:.2f} s with shift_divergences ({naive_s / shared_s:.1f}x)"
    )


def bench_bootstrap(n_resamples: int) -> None:
    print(f"\n## Bootstrap of EMI, B = {n_resamples}, n = 90, d = 768")
    club = _seeded_club()
    emb = TaskEmbeddings(_unit(90, 0), _unit(90, 1), _unit(90, 2), _unit(90, 3))
    start = time.perf_counter()
    interval = bootstrap_emi(club, emb, n_resamples=n_resamples, seed=0)
    fast = time.perf_counter() - start
    rng = np.random.default_rng(0)
    index = rng.integers(0, 90, size=(n_resamples, 90))
    start = time.perf_counter()
    loop = [effective_mutual_information(club, *emb.subset(row)).emi for row in index]
    slow = time.perf_counter() - start
    checked, mu, logvar = _conditionals(club, emb, "emb")
    vec = _resampled_emi(mu, logvar, checked.z_model, checked.z_ref, index)
    print(
        f"vectorised: {fast:.3f} s; one estimate per replicate: {slow:.2f} s ({slow / fast:.0f}x); "
        f"max |Δ| per replicate {np.max(np.abs(vec - np.asarray(loop))):.1e}; 95% CI {interval.low:+.4f} "
        f"{interval.high:+.4f}"
    )


class _FullCopyBootstrap:
    """The earlier bootstrap statistic, kept for comparison: full float64 copies of a = 1/(2σ²), b = μ·a and,
    per target, of y and y² (6 float64 (n, d) matrices held for the whole bootstrap), then
    Î(w) = wᵀpos + (wᵀa)·(wᵀy²) − 2 (wᵀb)·(wᵀy) + wᵀc for w = counts / n."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor, z_model: torch.Tensor, z_ref: torch.Tensor):
        mu = mu.to(torch.float64)
        self.a = 0.5 * torch.exp(-logvar.to(torch.float64))
        self.b = mu * self.a
        self.c = (mu * self.b).sum(dim=1)
        self.targets = []
        for y in (z_model, z_ref):
            y = y.to(torch.float64)
            pos = -((y - mu) ** 2 * self.a).sum(dim=1)
            self.targets.append((pos, y, y * y))
        self.n = int(mu.shape[0])

    def resampled_emi(self, index: np.ndarray) -> np.ndarray:
        index = np.atleast_2d(np.asarray(index))
        counts = np.zeros((index.shape[0], self.n))
        np.add.at(counts, (np.arange(index.shape[0])[:, None], index), 1.0)
        w = torch.from_numpy(counts / index.shape[1])
        wa, wb, wc = w @ self.a, w @ self.b, w @ self.c
        out = [
            w @ pos + (wa * (w @ y2)).sum(dim=1) - 2 * (wb * (w @ y)).sum(dim=1) + wc
            for pos, y, y2 in self.targets
        ]
        return (out[0] - out[1]).numpy()


def _bootstrap_memory_worker(n: int, n_resamples: int, mode: str, queue: mp.Queue) -> None:
    torch.set_num_threads(2)
    club = _seeded_club()
    emb = TaskEmbeddings(*(_unit(n, k) for k in range(4)))
    before = _rss_mib()
    start = time.perf_counter()
    if mode == "chunked":  # what the package runs
        interval = bootstrap_emi(club, emb, n_resamples=n_resamples, seed=0)
        ci = (interval.low, interval.high)
    elif mode == "full-copy":
        checked, mu, logvar = _conditionals(club, emb, "emb")
        full = _FullCopyBootstrap(mu, logvar, checked.z_model, checked.z_ref)
        interval = _percentile_bootstrap(
            (np.arange(n),), lambda idx, axis=-1: full.resampled_emi(idx), n_resamples, 0.95, 0
        )
        ci = (interval.low, interval.high)
    else:  # validation, normalised copies and μ, log σ² only: what both paths share
        _conditionals(club, emb, "emb")
        ci = (float("nan"), float("nan"))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"mode": mode, "seconds": seconds, "extra_peak_mib": peak - before, "ci": ci})


def bench_bootstrap_memory(n: int, n_resamples: int) -> None:
    print(f"\n## Bootstrap of EMI, peak memory: B = {n_resamples}, n = {n}, d = 768 (scipy batches of 256)")
    float64_copy_mib = n * D * 8 / 2**20
    print(f"(one float64 (n, d) matrix = {float64_copy_mib:.0f} MiB)")
    results = {
        m: _in_subprocess(_bootstrap_memory_worker, n, n_resamples, m)
        for m in ("shared", "full-copy", "chunked")
    }
    print(f"{'path':>28} {'seconds':>9} {'extra peak MiB':>15}  95% CI")
    labels = {
        "shared": "μ, log σ² only (shared)",
        "full-copy": "full float64 copies (old)",
        "chunked": "weighted, row chunks (new)",
    }
    for mode, r in results.items():
        ci = "" if mode == "shared" else f"[{r['ci'][0]:+.10f}, {r['ci'][1]:+.10f}]"
        print(f"{labels[mode]:>28} {r['seconds']:>9.2f} {r['extra_peak_mib']:>15.1f}  {ci}")
    shared, old, new = (results[m]["extra_peak_mib"] for m in ("shared", "full-copy", "chunked"))
    delta = max(abs(a - b) for a, b in zip(results["full-copy"]["ci"], results["chunked"]["ci"], strict=True))
    print(
        f"the bootstrap's own peak above the shared part: old {old - shared:.0f} MiB, new {new - shared:.0f} "
        f"MiB ({(old - shared) / max(new - shared, 1):.0f}x less); max |Δ CI| old vs new {delta:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": mp.cpu_count()}
    print("# lmms-emi estimator benchmark", json.dumps(info))
    if args.quick:
        bench_estimate([1000, 10_000], naive_max=1000)
        bench_training(steps=200, n=2000)
        bench_rjsd(90, 4)
        bench_bootstrap(200)
        bench_bootstrap_memory(20_000, 1000)
    else:
        bench_estimate([1000, 10_000, 100_000], naive_max=1000)
        bench_training(steps=5000, n=6300)
        bench_rjsd(90, 34)
        bench_bootstrap(1000)
        bench_bootstrap_memory(20_000, 1000)


if __name__ == "__main__":
    main()
