"""``lmms-emi compare RUN_A RUN_B``: whether one model's EMI is really higher than another's, by a paired
bootstrap over the questions both answered.

lmms-eval's ``--baseline`` compares two models' accuracy by a paired t-test over per-sample scores matched by
doc id. EMI is no mean of independent per-sample scores (CLUB's negative term couples every sample of a
task), so the analogue here is a **paired bootstrap**: per task, the two runs' samples are matched by
question (the image and question embeddings, which depend only on the document; the rows in ``doc_id``
order when they agree throughout), one set of resampling counts is drawn over the matched questions, and
both models' EMI is re-estimated on that same resample with one fixed estimator (the replicates of the
runs' own intervals, :meth:`~lmms_emi.emi.PreparedTask.replicates`). The spread of
EMI_A − EMI_B over the replicates gives its percentile interval and a two-sided bootstrap p-value; the
difference is significant when the interval excludes 0. Per-question terms
(:func:`~lmms_emi.estimators.club_form.club_sample_contributions`, whose mean is each model's EMI) give the
point difference and how many questions each model is ahead on.

Quantities per benchmark: EMI on the ID task, EMI under shift (mean over the shifted tasks; each task
resampled on its own, as the leaderboard's interval treats them), and mean EMID. Both runs are scored with
one estimator: their own when it is the same by content (:func:`~lmms_emi.leaderboard.runs.same_estimator`),
else a refusal naming it, unless one is given (``estimator``). Seeded and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmms_emi.errors import UsageError
from lmms_emi.leaderboard.runs import (
    RunResults,
    encoders_label,
    estimator_label,
    find_results_files,
    load_run,
    same_estimator,
)
from lmms_emi.tables import fmt_number, markdown_table

__all__ = ["Comparison", "Difference", "compare_runs", "match_samples"]

_CLOSE = 1e-5  # the same question embedded twice (another batch, another machine): equal to this


@dataclass(frozen=True)
class Difference:
    """One quantity of A and of B, their difference A − B, its percentile interval and bootstrap p-value."""

    benchmark: str
    quantity: str
    a: float
    b: float
    diff: float
    ci: tuple[float, float] | None
    p_value: float | None
    n_questions: int
    a_ahead: int | None = None  # questions where A's per-question EMI term is higher (ID task only)

    @property
    def significant(self) -> bool | None:
        if self.ci is None:
            return None
        return not (self.ci[0] <= 0.0 <= self.ci[1])


@dataclass
class Comparison:
    """A paired comparison of run ``a`` and run ``b``."""

    a: RunResults
    b: RunResults
    estimator: str
    n_resamples: int
    confidence_level: float
    seed: int
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": {"results_file": str(self.a.path), "model": self.a.model, "run": self.a.run},
            "b": {"results_file": str(self.b.path), "model": self.b.model, "run": self.b.run},
            "estimator": self.estimator,
            "n_resamples": self.n_resamples,
            "confidence_level": self.confidence_level,
            "seed": self.seed,
            "differences": [{**asdict(d), "significant": d.significant} for d in self.differences],
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def to_markdown(self) -> str:
        a, b = self.a, self.b
        lines = [
            f"# EMI: {a.model} ({a.run}) vs {b.model} ({b.run})",
            "",
            f"A = {a.label}; B = {b.label}. Estimator {self.estimator}; encoders "
            f"{encoders_label(a.encoders)}. "
            f"Paired bootstrap over the questions both answered: {self.n_resamples} resamples, seed "
            f"{self.seed}, {self.confidence_level:.0%} interval; significant when it excludes 0.",
            "",
        ]
        head = [
            "benchmark",
            "quantity",
            "A",
            "B",
            f"A − B [{self.confidence_level:.0%} CI]",
            "p",
            "significant",
            "questions",
        ]
        rows = []
        for d in self.differences:
            ci = "" if d.ci is None else f" [{d.ci[0]:.3f}, {d.ci[1]:.3f}]"
            verdict = "–" if d.significant is None else ("yes" if d.significant else "no")
            ahead = "" if d.a_ahead is None else f" (A ahead on {d.a_ahead})"
            rows.append(
                [
                    d.benchmark,
                    d.quantity,
                    fmt_number(d.a),
                    fmt_number(d.b),
                    f"{d.diff:+.3f}{ci}",
                    fmt_number(d.p_value),
                    verdict,
                    f"{d.n_questions}{ahead}",
                ]
            )
        lines += markdown_table(head, rows)
        lines.append("")
        lines.append(
            "EMI in nats, higher is better; EMI under shift = mean over the shifted tasks; mean EMID = "
            "ID EMI − EMI under shift, lower is more robust."
        )
        lines.extend(f"- note: {n}" for n in self.notes)
        return "\n".join(lines) + "\n"


def _one_run(path: str | Path) -> RunResults:
    """A results JSON, or a folder holding exactly one (UsageError otherwise)."""
    if Path(path).is_dir():
        files = find_results_files([path]).files
        if len(files) != 1:
            raise UsageError(f"{path}: holds {len(files)} results files; name the one to compare")
        path = files[0]
    return load_run(path)


# ---------------------------------------------------------------------------------------------- matching
def _row_keys(emb: Any) -> list[str]:
    """Per row, the sha256 of the question's image and text embeddings (float32 bytes)."""
    import torch

    zv = emb.z_v.detach().to("cpu", torch.float32).contiguous().numpy()
    zt = emb.z_t.detach().to("cpu", torch.float32).contiguous().numpy()
    return [hashlib.sha256(zv[i].tobytes() + b"|" + zt[i].tobytes()).hexdigest() for i in range(len(zv))]


def match_samples(a: Any, b: Any) -> tuple[list[int], list[int], str]:
    """Rows of task embeddings ``a`` and ``b`` that are the same question: (rows of a, rows of b, how).

    Row by row (both in doc_id order) when the two hold as many rows whose image and question embeddings
    agree to 1e-5; else by exact content of those embeddings (a question asked twice matches in order)."""
    import torch

    if a.n == b.n and all(
        torch.allclose(x.to(torch.float32), y.to(torch.float32), atol=_CLOSE, rtol=0)
        for x, y in ((a.z_v, b.z_v), (a.z_t, b.z_t))
    ):
        return list(range(a.n)), list(range(b.n)), "by doc_id order"
    rows_b: dict[str, list[int]] = {}
    for j, key in enumerate(_row_keys(b)):
        rows_b.setdefault(key, []).append(j)
    ia, ib = [], []
    for i, key in enumerate(_row_keys(a)):
        if rows_b.get(key):
            ia.append(i)
            ib.append(rows_b[key].pop(0))
    return ia, ib, "by question content"


# -------------------------------------------------------------------------------------------- estimator
def _estimator(a: RunResults, b: RunResults, choice: str | None, spec: Mapping[str, Any]) -> tuple[Any, str]:
    """The one estimator both runs are scored with, and its label."""
    from lmms_emi.pipeline.estimator import EstimatorPolicy, fixed_estimator

    given = choice
    if choice is None:
        same, key = same_estimator(a.estimator, b.estimator)
        if not same:
            why = f"{key} differs" if key else "no common key (sha256, name or path) records them"
            raise UsageError(
                f"the runs' estimators differ ({why}): {a.label} uses {estimator_label(a.estimator)}, "
                f"{b.label} uses {estimator_label(b.estimator)}; score both with one: --estimator "
                "FILE_OR_NAME (e.g. the leaderboard_club.safetensors that `lmms-emi leaderboard "
                "--common-estimator` saves)"
            )
        found = a.artifact("estimator") or b.artifact("estimator")
        name = a.estimator.get("name")
        if found is None and not name:
            raise UsageError(
                f"{a.label}: its estimator file ({a.estimator.get('path')}) is not on this machine; pass it "
                "with --estimator FILE_OR_NAME"
            )
        choice = str(found) if found is not None else str(name)
    fixed = fixed_estimator(EstimatorPolicy(choice, progress=False), spec)
    if fixed is None:
        raise UsageError(f"--estimator {choice}: name a checkpoint file or a registered estimator")
    club, info = fixed
    if given is None:  # the runs' own: the file found must be what they recorded
        same, key = same_estimator(info.to_dict(), a.estimator)
        if not same:
            raise UsageError(
                f"{choice} is not the estimator {a.label} recorded ({key or 'no common key'} differs); pass "
                "the right one with --estimator FILE_OR_NAME"
            )
    return club, estimator_label(info.to_dict())


# ------------------------------------------------------------------------------------------- bootstrap
def _task_seed(seed: int, task: str) -> int:
    from lmms_emi.pipeline.shift import task_seed

    return task_seed(seed, f"compare:{task}")


@dataclass
class _Paired:
    """One task of both runs on their matched questions: point EMI of each, per-replicate EMI of each."""

    n: int
    emi_a: float
    emi_b: float
    reps_a: np.ndarray
    reps_b: np.ndarray
    a_ahead: int


def _paired_task(club: Any, task: str, ea: Any, eb: Any, n_resamples: int, seed: int) -> _Paired:
    import torch

    from lmms_emi.emi import prepare_task
    from lmms_emi.estimators.club_form import club_sample_contributions

    pa, pb = prepare_task(club, ea, f"A {task}"), prepare_task(club, eb, f"B {task}")
    terms = []
    for p in (pa, pb):
        s = club_sample_contributions(p.mu, p.logvar, (p.emb.z_model, p.emb.z_ref))
        terms.append((s[0] - s[1]).cpu().numpy())  # per-question EMI terms; their mean is the task's EMI
    n = ea.n
    reps_a = reps_b = np.zeros(0)
    if n_resamples:
        rng = np.random.default_rng(_task_seed(seed, task))
        counts = torch.as_tensor(rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples))
        out_a, out_b = pa.replicates(counts), pb.replicates(counts)  # the same resample for both
        reps_a = (out_a[0] - out_a[1]).cpu().numpy()
        reps_b = (out_b[0] - out_b[1]).cpu().numpy()
    return _Paired(
        n, float(terms[0].mean()), float(terms[1].mean()), reps_a, reps_b, int((terms[0] > terms[1]).sum())
    )


def _summary(
    benchmark: str,
    quantity: str,
    a: float,
    b: float,
    reps: np.ndarray,
    level: float,
    n: int,
    a_ahead: int | None = None,
) -> Difference:
    diff = a - b
    if reps.size == 0:
        return Difference(benchmark, quantity, a, b, diff, None, None, n, a_ahead)
    alpha = 1.0 - level
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    tail = min(np.sum(reps <= 0.0), np.sum(reps >= 0.0))
    p = min(1.0, 2.0 * (tail + 1) / (reps.size + 1))
    ci = (float(low), float(high))
    return Difference(benchmark, quantity, a, b, diff, ci, float(p), n, a_ahead)


def compare_runs(
    path_a: str | Path,
    path_b: str | Path,
    *,
    estimator: str | None = None,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """The paired comparison of two runs' results JSON (see the module docstring). UsageError (one line)
    for a run without saved embeddings, other encoders, estimators that differ (without ``estimator``),
    or no task both runs share."""
    from lmms_emi.embed.store import load_embeddings
    from lmms_emi.encoder_spec import spec_differences

    if n_resamples < 0:
        raise UsageError(f"the number of bootstrap resamples must be >= 0, got {n_resamples}")
    if not 0 < confidence_level < 1:
        raise UsageError(f"the confidence level must be in (0, 1), got {confidence_level}")
    a, b = _one_run(path_a), _one_run(path_b)
    loaded = []
    for run in (a, b):
        file = run.artifact("embeddings")
        if file is None:
            raise UsageError(
                f"{run.label}: no saved embeddings ({run.path.parent}/{run.run_id}_emi_embeddings."
                "safetensors); compare needs each run's per-question embeddings"
            )
        loaded.append(load_embeddings(file))
    (tasks_a, spec_a), (tasks_b, spec_b) = loaded
    diff = spec_differences(spec_a, spec_b, expected_label=a.label, actual_label=b.label)
    if diff:
        raise UsageError(f"the runs used other encoders: {'; '.join(diff[:3])}")
    club, label = _estimator(a, b, estimator, spec_a)
    out = Comparison(a, b, label, n_resamples, confidence_level, seed)
    level = confidence_level
    for benchmark, analysis in a.analyses.items():
        other = b.analyses.get(benchmark)
        if other is None:
            out.notes.append(f"{benchmark}: only in A, not compared")
            continue
        id_task = analysis.get("id_task")
        names = [t.get("task") for t in analysis.get("tasks") or []]
        names_b = {t.get("task") for t in other.get("tasks") or []}
        paired: dict[str, _Paired] = {}
        for task in names:
            ea, eb = tasks_a.get(task), tasks_b.get(task)
            if task not in names_b or ea is None or eb is None:
                out.notes.append(f"{benchmark}: task {task} is not in both runs' embeddings, not compared")
                continue
            if any(z is None for z in (ea.z_model, ea.z_ref, eb.z_model, eb.z_ref)):
                out.notes.append(f"{benchmark}: task {task} has no responses or references, not compared")
                continue
            ia, ib, how = match_samples(ea, eb)
            if len(ia) < 2:
                out.notes.append(
                    f"{benchmark}: task {task}: fewer than 2 questions in both runs, not compared"
                )
                continue
            if len(ia) < max(ea.n, eb.n) or how != "by doc_id order":
                out.notes.append(
                    f"{benchmark}: task {task}: {len(ia)} questions matched {how} (A has {ea.n}, B {eb.n})"
                )
            sub_a = ea if len(ia) == ea.n and how == "by doc_id order" else ea.subset(ia)
            sub_b = eb if len(ib) == eb.n and how == "by doc_id order" else eb.subset(ib)
            paired[task] = _paired_task(club, task, sub_a, sub_b, n_resamples, seed)
        idp = paired.get(id_task)
        shifted = [p for t, p in paired.items() if t != id_task]
        if idp is not None:
            out.differences.append(
                _summary(
                    benchmark,
                    "ID EMI",
                    idp.emi_a,
                    idp.emi_b,
                    idp.reps_a - idp.reps_b,
                    level,
                    idp.n,
                    idp.a_ahead,
                )
            )
        if shifted:
            ea_ = float(np.mean([p.emi_a for p in shifted]))
            eb_ = float(np.mean([p.emi_b for p in shifted]))
            reps = np.mean([p.reps_a - p.reps_b for p in shifted], axis=0) if n_resamples else np.zeros(0)
            n = sum(p.n for p in shifted)
            out.differences.append(_summary(benchmark, "EMI under shift", ea_, eb_, reps, level, n))
            if idp is not None:
                reps_emid = (idp.reps_a - idp.reps_b) - reps if n_resamples else np.zeros(0)
                out.differences.append(
                    _summary(
                        benchmark, "mean EMID", idp.emi_a - ea_, idp.emi_b - eb_, reps_emid, level, n + idp.n
                    )
                )
    if not out.differences:
        raise UsageError(f"{a.label} and {b.label} share no task with EMI to compare")
    if any(not math.isfinite(d.diff) for d in out.differences):
        raise UsageError("a difference is not finite (degenerate embeddings or estimator)")
    return out
