"""Report files: per analysis JSON, CSV, Markdown and a PNG scatter plot; per run also the embeddings file
(input of ``train-estimator``) and the estimator when it was fitted on the run.

Every file is written atomically, so a reader never sees a half-written report and an interrupted run leaves
no temp files behind; a run's files carry its id (:func:`write_run_reports`), and no run replaces another's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmms_emi._io import WriteFailed, atomic_write, atomic_write_text, scratch_dir
from lmms_emi.embed.store import EMBEDDINGS_FILE, save_embeddings
from lmms_emi.estimator_registry import file_sha256
from lmms_emi.figure import ScatterFigure, draw
from lmms_emi.pipeline.estimator import FITTED_CHECKPOINT_NAME
from lmms_emi.pipeline.run import RunAnalysis
from lmms_emi.pipeline.shift import ShiftAnalysis, TaskResult, json_ready
from lmms_emi.report_agreement import agreement_headline, write_agreement_report
from lmms_emi.tables import csv_table, fmt_ci, fmt_number, markdown_table

AGREEMENT_REPORT = "emi_agreement"  # the report of a run with a judge step

__all__ = [
    "CSV_COLUMNS",
    "RUN_ID_FORMAT",
    "entropy_line",
    "format_headlines",
    "new_run_id",
    "robustness_summary",
    "to_csv",
    "to_markdown",
    "write_report",
    "write_run_reports",
]

CSV_COLUMNS: tuple[str, ...] = (
    "task",
    "shift_kind",
    "n",
    "emi",
    "emi_ci_low",
    "emi_ci_high",
    "emid",
    "emid_ci_low",
    "emid_ci_high",
    "bound",
    "bound_theorem",
    "partial_bound",
    "jsd_visual",
    "jsd_text",
    "jsd_response_p",
    "jsd_response_q",
    "mi_model",
    "mi_ref",
    "warnings",
)


def _row(t: TaskResult) -> dict[str, Any]:
    emi_ci = t.emi_ci or (None, None)
    emid_ci = t.emid_ci or (None, None)
    return {
        "task": t.task,
        "shift_kind": t.shift_kind,
        "n": t.n,
        "emi": t.emi,
        "emi_ci_low": emi_ci[0],
        "emi_ci_high": emi_ci[1],
        "emid": t.emid,
        "emid_ci_low": emid_ci[0],
        "emid_ci_high": emid_ci[1],
        "bound": t.bound,
        "bound_theorem": t.bound_theorem,
        "partial_bound": t.partial_bound,
        "jsd_visual": t.jsd_visual,
        "jsd_text": t.jsd_text,
        "jsd_response_p": t.jsd_response_p,
        "jsd_response_q": t.jsd_response_q,
        "mi_model": t.mi_model,
        "mi_ref": t.mi_ref,
        "warnings": "; ".join(t.warnings),
    }


def to_csv(analysis: ShiftAnalysis) -> str:
    """One row per task, columns :data:`CSV_COLUMNS` (floats at full precision, absent values empty)."""
    rows = (_row(t) for t in analysis.tasks)
    return csv_table(CSV_COLUMNS, ([row[c] for c in CSV_COLUMNS] for row in rows))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def robustness_summary(analysis: ShiftAnalysis) -> dict[str, Any]:
    """The leaderboard numbers: ID EMI (+CI), mean OOD EMI, mean / worst EMID (lower = more robust) and the
    Pearson r between EMID and its bound over the OOD tasks."""
    id_row = analysis.task(analysis.id_task)
    ood = analysis.ood_tasks
    emids = [t.emid for t in ood if t.emid is not None]
    corr = analysis.correlation
    return {
        "model": analysis.metadata.get("model"),
        "id_task": analysis.id_task,
        "id_emi": id_row.emi,
        "id_emi_ci": list(id_row.emi_ci) if id_row.emi_ci else None,
        "mean_ood_emi": _mean([t.emi for t in ood if t.emi is not None]),
        "mean_emid": _mean(emids),
        "worst_emid": max(emids) if emids else None,
        "worst_emid_task": max((t for t in ood if t.emid is not None), key=lambda t: t.emid).task
        if emids
        else None,
        "mean_partial_bound": _mean([t.partial_bound for t in ood if t.partial_bound is not None]),
        "n_ood_tasks": len(ood),
        "pearson_r": None if corr is None else corr.pearson_r,
        "pearson_p": None if corr is None else corr.pearson_p,
    }


def to_markdown(analysis: ShiftAnalysis) -> str:
    """A leaderboard row (robustness column) plus a per-task table, as Markdown."""
    s = robustness_summary(analysis)
    level = analysis.settings.get("confidence_level", 0.95)
    model = s["model"] or "model"
    lines = [f"# EMI robustness report: {model}", ""]
    est = analysis.estimator
    if est is not None:
        where = f" `{est.path}`" if est.path else ""
        lines.append(f"Estimator: {est.source}{where} (values comparable: {est.comparability}).")
        if est.note:
            lines.append(f"Note: {est.note}.")
        lines.append("")
    row = [
        model,
        fmt_ci(s["id_emi"], s["id_emi_ci"], 4),
        *(fmt_number(s[k], 4) for k in ("mean_ood_emi", "mean_emid", "worst_emid")),
        fmt_number(s["pearson_r"]),
    ]
    lines += [
        "## Leaderboard row",
        "",
        "EMI: effective mutual information (nats, higher = responses more relevant to the query). "
        "EMID = EMI(ID) − EMI(shifted) (lower = more robust).",
        "",
        *markdown_table(
            ["model", "ID EMI", "mean OOD EMI", "mean EMID ↓", "worst EMID", "r(EMID, bound)"], [row]
        ),
        "",
        f"## Per task (ID task: `{analysis.id_task}`; intervals: {level:.0%} bootstrap)",
        "",
    ]
    theorem = analysis.settings.get("entropy_scale") is not None
    if theorem:
        lines += [entropy_line(analysis.settings), ""]
    header = ["task", "shift", "n", "EMI", "EMID", "bound", *(["theorem bound"] if theorem else [])]
    header += ["partial bound", "D_v", "D_t", "D_P", "D_Q"]
    rows = [
        [
            f"`{t.task}`{' ⚠' if t.warnings else ''}",
            t.shift_kind,
            str(t.n),
            fmt_ci(t.emi, t.emi_ci, 4),
            fmt_ci(t.emid, t.emid_ci, 4),
            fmt_number(t.bound, 4),
            *([fmt_number(t.bound_theorem, 4)] if theorem else []),
            *(fmt_number(v, 4) for v in (t.partial_bound, t.jsd_visual, t.jsd_text)),
            *(fmt_number(v, 4) for v in (t.jsd_response_p, t.jsd_response_q)),
        ]
        for t in analysis.tasks
    ]
    lines += markdown_table(header, rows)
    flagged = [f"- `{t.task}`: {w}" for t in analysis.tasks for w in t.warnings]
    if flagged:  # numbers of these rows are computed on thin or degenerate data: not results to quote
        lines += ["", "## Warnings (⚠ rows: do not quote these numbers as results)", "", *flagged]
    lines += ["", "## Correlation of EMID with its upper bound over the OOD tasks", ""]
    for name, corr in analysis.correlations.items():
        if corr is None:
            lines.append(f"- {name}: not computed (fewer than 3 OOD tasks with EMID)")
        else:
            lines.append(
                f"- {name}: Pearson r = {fmt_number(corr.pearson_r)} (p = {fmt_number(corr.pearson_p)}), "
                f"Spearman ρ = {fmt_number(corr.spearman_rho)}, Kendall τ = {fmt_number(corr.kendall_tau)}, "
                f"n = {corr.n_tasks}"
            )
    return "\n".join(lines) + "\n"


def entropy_line(settings: Mapping[str, Any]) -> str:
    """What the theorem bound's Ĥ is and where it came from (given, or estimated from log-probabilities)."""
    value = settings["entropy_scale"]
    estimate = settings.get("entropy_scale_estimate")
    if not estimate:
        return f"Theorem 4.5 bound: Ĥ = {fmt_number(value, 4)} nats (given)."
    return (
        f"Theorem 4.5 bound: Ĥ = {fmt_number(value, 4)} nats, an **estimate** from the model's token "
        f"log-probabilities: the largest −log p(ŷ|x) − log p(y|x) over {estimate['n_queries']} queries "
        f"(`{estimate['task']}` doc {estimate['doc_id']}: {fmt_number(estimate['response_nll'], 4)} + "
        f"{fmt_number(estimate['reference_nll'], 4)}). The response's NLL estimates H(P_θ(·|x)) (below it "
        "for greedy answers) and the reference's estimates the cross-entropy, above H(Q_Y|x)."
    )


def emid_figure(analysis: ShiftAnalysis) -> ScatterFigure:
    """The report's figure: EMID (y) against the scale-adjusted bound (x) of each OOD task, with r in the
    title."""
    rows = [t for t in analysis.ood_tasks if t.emid is not None and t.bound is not None]
    corr = analysis.correlation
    model = analysis.metadata.get("model")
    head = f"{model}: " if model else ""
    r_text = "n/a (< 3 OOD tasks)" if corr is None else f"{corr.pearson_r:.3f} (p = {corr.pearson_p:.2g})"
    return ScatterFigure(
        bounds=tuple(t.bound for t in rows),
        emids=tuple(t.emid for t in rows),
        kinds=tuple(t.shift_kind for t in rows),
        # two lines: a model name plus the statistics do not fit the figure's width on one
        title=f"{head}EMID vs its upper bound\nPearson r = {r_text}, n = {len(rows)} OOD tasks",
        # plain Unicode, no mathtext: its parser is the slowest part of drawing this figure
        xlabel="EMID upper bound  √D_v + √D_t + D_P^¼ + D_Q^¼  (scale-adjusted)",
        ylabel=f"EMID = EMI(ID) − EMI(OOD)  [nats]\nID: {analysis.id_task}",
    )


def write_report(
    analysis: ShiftAnalysis,
    out_dir: str | Path,
    *,
    prefix: str = "emi_report",
) -> dict[str, Path]:
    """Write ``<prefix>.json``, ``.csv``, ``.md`` and ``.png`` into ``out_dir``; return their paths by kind
    ("json", "csv", "markdown", "png")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**analysis.to_dict(), "summary": json_ready(robustness_summary(analysis))}
    texts = {
        "json": (f"{prefix}.json", json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"),
        "csv": (f"{prefix}.csv", to_csv(analysis)),
        "markdown": (f"{prefix}.md", to_markdown(analysis)),
    }
    paths: dict[str, Path] = {}
    for kind, (name, text) in texts.items():
        paths[kind] = atomic_write_text(out / name, text)
    paths["png"] = atomic_write(out / f"{prefix}.png", lambda tmp: draw(emid_figure(analysis), tmp))
    return paths


RUN_ID_FORMAT = "%Y%m%d_%H%M%S"  # lmms-eval's own results-file date format


def new_run_id() -> str:
    """A run id for a run without an lmms-eval results file (``score``, ``analyze``): the local time."""
    return time.strftime(RUN_ID_FORMAT)


_STAGING = ".emi_staging_"  # + <pid>_<random>: a run's private folder, published by hard links


class _PrefixTaken(Exception):
    """Another run already published files under this prefix."""


def write_run_reports(
    run: RunAnalysis, out_dir: str | Path, *, run_id: str | None = None
) -> dict[str, dict[str, Path]]:
    """Write everything a run produced into ``out_dir``, every name prefixed with the run's id: the
    embeddings file (``<id>_emi_embeddings.safetensors``), the fitted estimator when the run fitted one
    (``<id>_club_fitted.safetensors``; the reports then name it) and one report per analysis
    (``<id>_emi_report_<benchmark or task>.*``).

    ``run_id``: for an lmms-eval run the date id of its results file (``<id>_results.json``), so the
    artifacts sit beside the record that points at them; default :func:`new_run_id`. No file of another run
    is ever replaced: the files are written to a private staging folder and published with hard links that
    refuse existing names; when the id is taken (two runs in one second), ``<id>-2``, ``<id>-3``, ... is
    used. Returns {report name: {kind: path}} plus ``"run"`` with the embeddings and estimator paths.
    Updates ``run`` with the estimator's saved path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = run_id or new_run_id()
    for attempt in range(1, 1000):
        prefix = base if attempt == 1 else f"{base}-{attempt}"
        try:
            return _publish_run_reports(run, out, prefix)
        except _PrefixTaken:
            continue
    raise FileExistsError(f"{out}: no free run id after {base}-999")


def _publish_run_reports(run: RunAnalysis, out: Path, prefix: str) -> dict[str, dict[str, Path]]:
    embeddings_name = f"{prefix}_{EMBEDDINGS_FILE}"
    if (out / embeddings_name).exists():
        raise _PrefixTaken
    staging = scratch_dir(_STAGING, out)  # (a killed run's staging folder goes now)
    linked: list[Path] = []  # published so far: taken back if the run cannot publish them all
    try:
        staged: list[str] = []  # names in publishing order: the embeddings file first claims the prefix
        files: dict[str, Path] = {}
        save_embeddings(
            run.embeddings, staging / embeddings_name, encoders=run.encoder_spec, extra=run.metadata
        )
        staged.append(embeddings_name)
        files["embeddings"] = out / embeddings_name
        if run.estimator.source == "fitted":
            name = f"{prefix}_{FITTED_CHECKPOINT_NAME}"
            run.club.save(staging / name, run.club.make_manifest(run.encoder_spec))
            staged.append(name)
            files["estimator"] = out / name
            written_manifest = run.club.manifest_
            manifest = asdict(written_manifest) if written_manifest is not None else run.estimator.manifest
            run.estimator = replace(  # the manifest as written: with its tensors' checksum
                run.estimator, path=str(out / name), sha256=file_sha256(staging / name), manifest=manifest
            )
            run.benchmarks = {k: a.with_context(estimator=run.estimator) for k, a in run.benchmarks.items()}
            run.singles = {k: a.with_context(estimator=run.estimator) for k, a in run.singles.items()}
        written: dict[str, dict[str, Path]] = {}
        for report_name, analysis in run.analyses.items():
            paths = write_report(analysis, staging, prefix=f"{prefix}_{report_name}")
            staged.extend(p.name for p in paths.values())
            written[report_name] = {kind: out / p.name for kind, p in paths.items()}
        if run.judge is not None:  # EMI vs the judge's win rate (lmms_emi.report_agreement)
            level = run.settings.confidence_level
            model = run.metadata.get("model")
            name = f"{prefix}_{AGREEMENT_REPORT}"
            paths = write_agreement_report(run.judge, staging, prefix=name, model=model, level=level)
            staged.extend(p.name for p in paths.values())
            written[AGREEMENT_REPORT] = {kind: out / p.name for kind, p in paths.items()}
        for i, name in enumerate(staged):
            try:
                os.link(staging / name, out / name)
            except FileExistsError:
                if i == 0:
                    raise _PrefixTaken from None
                raise FileExistsError(
                    f"{out / name} appeared while this run was writing its reports; nothing overwritten"
                ) from None
            except OSError as exc:
                raise WriteFailed(exc.errno, exc.strerror, str(out / name)) from None
            linked.append(out / name)
    except WriteFailed as exc:  # name the file the user will look for, not its staging copy
        for path in linked:
            path.unlink(missing_ok=True)
        target = out / Path(str(exc.filename)).name
        raise WriteFailed(exc.errno, exc.strerror, str(target)) from None
    except BaseException:
        for path in linked:  # nothing partial: a run's files are published all or none
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written["run"] = files
    return written


def format_headlines(run: RunAnalysis) -> list[str]:
    """One line per analysis: ID EMI, mean / worst EMID and r(EMID, bound) — what a command prints."""

    def f(v: float | None) -> str:
        return fmt_number(v, 4, missing="n/a")

    lines = []
    for name, analysis in run.analyses.items():
        s = robustness_summary(analysis)
        lines.append(
            f"{name}: ID EMI {f(s['id_emi'])} ({analysis.id_task}); mean EMID {f(s['mean_emid'])}, "
            f"worst {f(s['worst_emid'])}; r(EMID, bound) {f(s['pearson_r'])} over {s['n_ood_tasks']} OOD "
            "tasks"
        )
    if run.entropy_estimate is not None:
        h = run.entropy_estimate
        lines.append(
            f"Ĥ (estimate, from token log-probabilities) {f(h['value'])} nats, the largest over "
            f"{h['n_queries']} queries ({h['task']} doc {h['doc_id']}); the theorem bound uses it"
        )
    if run.judge is not None:
        lines.append(agreement_headline(run.judge))
    return lines
