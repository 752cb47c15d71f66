"""The agreement report of a run with a judge step (paper Table 2 on the user's own run): per task EMI, the
judge's win rate and relative score with the counts of scored / excluded samples; across tasks Spearman ρ
and Kendall τ with p-values and bootstrap intervals; the same statistics for the judge-free baselines
(CLIPScore, RefCLIPScore, response-reference cosine on the run's embeddings) so a reader sees whether EMI
tells more than they do; the per-sample agreement; the cost of the judge beside the EMI pipeline's own time
(paper Table 7); a scatter of EMI against WR coloured by shift kind.

Files: ``<prefix>.json`` (everything, with each sample's verdict), ``.csv`` (one row per task), ``.md``
and ``.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmms_emi._io import atomic_write, atomic_write_text
from lmms_emi.pipeline.agreement import BASELINES, CLIP_SCORE_WEIGHT, Agreement, JudgeAnalysis
from lmms_emi.tables import csv_table, fmt_ci, fmt_number, fmt_p, markdown_table

__all__ = ["AGREEMENT_COLUMNS", "agreement_headline", "to_csv", "to_markdown", "write_agreement_report"]

AGREEMENT_COLUMNS = (
    "task",
    "shift_kind",
    "emi",
    "win_rate",
    "relative_score",
    "n_scored",
    "n_excluded",
    "n_wins",
    "mean_ref_score",
    "mean_model_score",
    "source",
    *BASELINES,
)
_KIND_COLOURS = {
    "id": "tab:green",
    "visual": "tab:blue",
    "text": "tab:orange",
    "joint": "tab:red",
    "ood": "tab:grey",
}


def _agreement_line(name: str, a: Agreement | None) -> str:
    if a is None:
        return f"- {name}: not computed (fewer than 3 tasks with both EMI and a win rate)"
    return (
        f"- {name}: Spearman ρ = {fmt_ci(a.spearman_rho, a.spearman_ci)} (p = {fmt_p(a.spearman_p)}), "
        f"Kendall τ = {fmt_ci(a.kendall_tau, a.kendall_ci)} (p = {fmt_p(a.kendall_p)}), "
        f"n = {a.n_tasks} tasks"
    )


def _baseline_rows(judge: JudgeAnalysis, name: str | None = None) -> list[list[str]]:
    """Rows of the baselines table: EMI first, then each baseline (``name``: one benchmark's)."""
    scores = {"emi": judge.agreement if name is None else judge.by_benchmark.get(name)}
    scores |= judge.baselines if name is None else judge.baselines_by_benchmark.get(name, {})
    rows = []
    for key, a in scores.items():
        label = "EMI" if key == "emi" else BASELINES[key]
        if a is None:
            rows.append([label, "–", "–", "–", "–", "< 3 tasks"])
            continue
        rows.append(
            [
                label,
                fmt_ci(a.spearman_rho, a.spearman_ci),
                fmt_p(a.spearman_p),
                fmt_ci(a.kendall_tau, a.kendall_ci),
                fmt_p(a.kendall_p),
                str(a.n_tasks),
            ]
        )
    return rows


def _baselines_section(judge: JudgeAnalysis, level: float) -> list[str]:
    """The baselines beside EMI: the same agreement statistics with WR, and the space they live in."""
    if not judge.baselines:
        return []
    lines = [
        "",
        f"## Does EMI tell more than a similarity score? ({level:.0%} bootstrap intervals over tasks)",
        "",
        "Judge-free baselines, task means over the same samples EMI uses: CLIPScore = "
        f"{CLIP_SCORE_WEIGHT}·max(cos(image, response), 0); RefCLIPScore = harmonic mean of CLIPScore and "
        "max(cos(response, reference), 0) (Hessel et al. 2021); cos(response, reference). Embedding space: "
        + (judge.baseline_space or "the run's embeddings.")
        + " A baseline that agrees with WR as well as EMI does means EMI adds nothing on this data.",
        "",
    ]
    header = ["score", "Spearman ρ", "p", "Kendall τ", "p", "tasks"]
    lines += markdown_table(header, _baseline_rows(judge))
    if len(judge.baselines_by_benchmark) > 1:
        for name in judge.baselines_by_benchmark:
            lines += ["", f"{name}:", ""]
            lines += markdown_table(header, _baseline_rows(judge, name))
    return lines


def to_csv(judge: JudgeAnalysis) -> str:
    """One row per judged task, columns :data:`AGREEMENT_COLUMNS` (floats at full precision, absent values
    empty)."""
    rows = ([getattr(t, c) for c in AGREEMENT_COLUMNS] for t in judge.tasks.values())
    return csv_table(AGREEMENT_COLUMNS, rows)


def to_markdown(judge: JudgeAnalysis, *, model: str | None = None, level: float = 0.95) -> str:
    """The agreement table, the correlations, the per-sample agreement and the cost, as Markdown."""
    head = f"# EMI vs judge: {model}" if model else "# EMI vs judge"
    judge_model = judge.config.get("model")
    lines = [head, ""]
    if judge_model:
        lines += [f"Judge: `{judge_model}` at {judge.config.get('base_url')}.", ""]
    lines += [
        "WR = mean 1[r(ŷ) > r(y)] over the scored samples (paper Eq. 2; a tie is not a win); relative score ="
        " mean r(ŷ) / mean r(y) × 100. Samples the judge could not score after its retries are excluded and "
        "counted, never scored.",
        "",
    ]
    rows = [
        [
            f"`{t.task}`",
            t.shift_kind,
            fmt_number(t.emi, 4),
            fmt_number(t.win_rate),
            fmt_number(t.relative_score, 1),
            str(t.n_scored),
            str(t.n_excluded),
            fmt_number(t.clip_score),
            fmt_number(t.ref_clip_score),
            fmt_number(t.response_reference_cosine),
        ]
        for t in judge.tasks.values()
    ]
    header = ["task", "shift", "EMI", "WR", "relative score", "scored", "excluded"]
    lines += markdown_table([*header, "CLIPScore", "RefCLIPScore", "cos(ŷ, y)"], rows)
    lines += ["", f"## Agreement of EMI and WR across tasks ({level:.0%} bootstrap intervals over tasks)", ""]
    lines.append(_agreement_line("all tasks", judge.agreement))
    if len(judge.by_benchmark) > 1 or (judge.by_benchmark and judge.agreement is None):
        for name, a in judge.by_benchmark.items():
            lines.append(_agreement_line(name, a))
    lines += _baselines_section(judge, level)
    s = judge.samples
    lines += ["", "## Per sample", ""]
    if s is None:
        lines.append("- not computed (fewer than 3 scored samples with embeddings)")
    else:
        lines.append(
            f"- per-sample EMI contribution e_i vs judge preference r(ŷ) − r(y): Spearman ρ = "
            f"{fmt_number(s.spearman_rho)} (p = {fmt_p(s.spearman_p)}); vs win: point-biserial r = "
            f"{fmt_number(s.pointbiserial_r)}, AUC = {fmt_number(s.auc)} (p = {fmt_p(s.auc_p)}); n = {s.n}, "
            f"{s.n_wins} wins"
        )
    c = judge.cost
    lines += ["", "## Cost", ""]
    lines.append(
        f"- judge: {fmt_number(c.get('judge_seconds'), 2)} s wall for {c.get('samples')} samples "
        f"({c.get('judge_calls')} calls, {c.get('judge_retries')} retries, "
        f"{c.get('cache_hits')} from the cache, "
        f"{c.get('from_log')} from the run's log); "
        f"{fmt_number(c.get('judge_seconds_per_sample'), 3)} s per sample sent"
    )
    tokens = c.get("tokens_per_sample")
    lines.append(
        f"- judge tokens per sample: {fmt_number(tokens, 1)}"
        if tokens is not None
        else "- judge tokens per sample: not reported (by the endpoint, or every verdict was cached / logged)"
    )
    lines.append(
        "- EMI pipeline (embedding, estimator, analysis) on the same samples: "
        f"{fmt_number(c.get('emi_seconds'), 2)} s "
        f"({fmt_number(c.get('emi_seconds_per_sample'), 4)} s per sample)"
    )
    excluded = {reason: n for t in judge.tasks.values() for reason, n in t.excluded_reasons.items() if reason}
    if judge.n_excluded:
        lines += [
            "",
            f"{judge.n_excluded} sample(s) excluded: "
            + "; ".join(f"{r} ({n})" for r, n in sorted(excluded.items())),
        ]
    for w in judge.warnings:
        lines.append(f"\nNote: {w}")
    return "\n".join(lines) + "\n"


def _write_png(judge: JudgeAnalysis, path: Path, model: str | None) -> None:
    """EMI (x) vs WR (y) per task, coloured by shift kind; ρ and τ in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [t for t in judge.tasks.values() if t.emi is not None and t.win_rate is not None]
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, colour in _KIND_COLOURS.items():
        pts = [t for t in rows if t.shift_kind == kind]
        if pts:
            ax.scatter(
                [t.emi for t in pts], [t.win_rate for t in pts], c=colour, label=kind, s=30, alpha=0.85
            )
    a = judge.agreement
    stats = (
        "n/a (< 3 tasks)"
        if a is None
        else f"Spearman ρ = {fmt_number(a.spearman_rho)}, Kendall τ = {fmt_number(a.kendall_tau)}, "
        f"n = {a.n_tasks}"
    )
    head = f"{model}: " if model else ""
    ax.set_title(f"{head}EMI vs judge win rate per task\n{stats}", fontsize=10)
    ax.set_xlabel("EMI = Î(x; ŷ) − Î(x; y)  [nats]")
    ax.set_ylabel("win rate  mean 1[r(ŷ) > r(y)]")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no task with EMI and a win rate", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_agreement_report(
    judge: JudgeAnalysis,
    out_dir: str | Path,
    *,
    prefix: str = "emi_agreement",
    model: str | None = None,
    level: float = 0.95,
) -> dict[str, Path]:
    """Write ``<prefix>.json`` (with every verdict), ``.csv``, ``.md`` and ``.png``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model, **judge.to_dict(with_judgments=True)}
    paths = {
        "json": atomic_write_text(
            out / f"{prefix}.json", json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        ),
        "csv": atomic_write_text(out / f"{prefix}.csv", to_csv(judge)),
        "markdown": atomic_write_text(out / f"{prefix}.md", to_markdown(judge, model=model, level=level)),
    }
    paths["png"] = atomic_write(out / f"{prefix}.png", lambda tmp: _write_png(judge, tmp, model))
    return paths


def agreement_headline(judge: JudgeAnalysis) -> str:
    """One line for a command's output: samples scored / excluded, mean WR, ρ and τ."""
    rates = [t.win_rate for t in judge.tasks.values() if t.win_rate is not None]
    mean_wr = sum(rates) / len(rates) if rates else None
    a = judge.agreement
    corr = (
        "ρ(EMI, WR) n/a (< 3 tasks)"
        if a is None
        else f"ρ(EMI, WR) {fmt_number(a.spearman_rho)} (p {fmt_p(a.spearman_p)}), "
        f"τ {fmt_number(a.kendall_tau)} (p {fmt_p(a.kendall_p)}) over {a.n_tasks} tasks"
    )
    counts = f"judge: {judge.n_scored} samples scored, {judge.n_excluded} excluded"
    return f"{counts}; mean WR {fmt_number(mean_wr)}; {corr}"
