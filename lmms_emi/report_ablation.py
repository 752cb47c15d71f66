"""The ablation report of a judged run (``lmms-emi ablate``), and what it reads of the run.

Reading: a judged run's report folder holds ``<id>_emi_agreement.json`` (the judge's win rate per task),
``<id>_emi_report_<name>.json`` (each analysis: its ID task and tasks, the run's metadata) and
``<id>_emi_embeddings.safetensors`` (the run's own embedding space); :func:`find_judged_run` finds them
(the latest run id in the folder or below it, or the one named). Another space's embeddings of the same
run are kept beside them as ``<id>_emi_space_<space>.safetensors`` (:func:`space_file`: a name that
``train-estimator``'s folder search for ``*emi_embeddings.safetensors`` does not pick up, so one run's
folder never mixes spaces).

Writing: ``<prefix>.json`` (every cell, with each task's EMI / EMID / bound), ``.csv`` (one row per cell),
``.md`` (Table 4: ρ(EMI, WR) per MI estimator × space; Table 5: r(EMID, bound) per JSD × MI estimator ×
space; each cell with its p-value and seconds) and ``.png`` (both tables as labelled heatmaps), published
together under a prefix no other file has (:func:`write_ablation_report`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_emi._io import WriteFailed, atomic_write, atomic_write_text, scratch_dir
from lmms_emi.errors import UsageError
from lmms_emi.pipeline.ablation import Ablation
from lmms_emi.tables import csv_table, fmt_number, fmt_p, markdown_table

__all__ = [
    "ABLATION_COLUMNS",
    "ABLATION_REPORT",
    "JudgedRun",
    "find_judged_run",
    "space_file",
    "to_csv",
    "to_markdown",
    "write_ablation_report",
]

ABLATION_REPORT = "emi_ablation"
AGREEMENT_SUFFIX = "_emi_agreement.json"
EMBEDDINGS_SUFFIX = "_emi_embeddings.safetensors"
REPORT_INFIX = "_emi_report_"
#: The paper's ranges (appendix C.2, four LLaVA models): context for a reader of the tables.
PAPER_RANGES = {"table4_rho": (0.269, 0.910), "table5_r": (0.273, 0.659)}
ABLATION_COLUMNS = (
    "table", "space", "mi_estimator", "jsd_estimator", "group", "id_task", "statistic", "value", "p",
    "n_tasks", "seconds", "error",
)  # fmt: skip


@dataclass
class JudgedRun:
    """What ``ablate`` reads of a judged run: its folder and id, each task's win rate, its shift groups
    (name -> ID task, tasks), the run's metadata (model, and where its records came from) and its saved
    embeddings file (None when absent)."""

    folder: Path
    run_id: str
    win_rates: dict[str, float | None]
    groups: dict[str, tuple[str, tuple[str, ...]]]
    metadata: dict[str, Any] = field(default_factory=dict)
    embeddings_file: Path | None = None

    @property
    def model(self) -> str | None:
        return self.metadata.get("model")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def find_judged_run(path: str | os.PathLike, run_id: str | None = None) -> JudgedRun:
    """The judged run in folder ``path`` (searched recursively: an lmms-eval output folder keeps its reports
    beside its results, ``analyze`` in ``emi_report/``): the one of id ``run_id``, else the latest. One
    :class:`UsageError` line when the folder is missing or holds no judge verdicts."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder")
    found = {p.name[: -len(AGREEMENT_SUFFIX)]: p for p in sorted(root.rglob(f"*{AGREEMENT_SUFFIX}"))}
    if not found:
        raise UsageError(
            f"{root}: no judge verdicts (no *{AGREEMENT_SUFFIX}); score or analyze the run with --judge first"
        )
    if run_id is not None and run_id not in found:
        raise UsageError(f"{root}: no judged run {run_id!r} (judged runs: {', '.join(sorted(found))})")
    chosen = run_id or max(found)
    agreement_path = found[chosen]
    folder = agreement_path.parent
    data = _read_json(agreement_path)
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise UsageError(f"{agreement_path}: no 'tasks' object (not an lmms-emi agreement report)")
    rates = {t: (row or {}).get("win_rate") for t, row in tasks.items()}
    if not any(r is not None for r in rates.values()):
        raise UsageError(f"{agreement_path}: no task has a judge win rate (no judge verdicts)")
    groups: dict[str, tuple[str, tuple[str, ...]]] = {}
    metadata: dict[str, Any] = {}
    for report in sorted(folder.glob(f"{chosen}{REPORT_INFIX}*.json")):
        body = _read_json(report)
        names = tuple(t["task"] for t in body.get("tasks", []))
        metadata = metadata or dict(body.get("metadata") or {})
        if len(names) > 1:  # an ID task and its shifted tasks
            groups[report.stem[len(chosen) + len(REPORT_INFIX) :]] = (str(body["id_task"]), names)
    embeddings = folder / f"{chosen}{EMBEDDINGS_SUFFIX}"
    return JudgedRun(folder, chosen, rates, groups, metadata, embeddings if embeddings.is_file() else None)


def space_file(run: JudgedRun, space: str) -> Path:
    """Where the run's embeddings in encoder profile ``space`` are kept, beside its own."""
    return run.folder / f"{run.run_id}_emi_space_{space}.safetensors"


# ------------------------------------------------------------------------------------------ tables
def _cell_text(value: float | None, p: float | None, seconds: float, n: int, error: str | None) -> str:
    if error is not None and value is None:
        return f"– ({error})"
    return f"{fmt_number(value)} (p {fmt_p(p)}, n {n}, {seconds:.2f} s)"


def to_csv(ablation: Ablation) -> str:
    """One row per cell, columns :data:`ABLATION_COLUMNS` (floats at full precision, absent values empty)."""
    rows: list[list[Any]] = []
    for c in ablation.agreement:
        rows.append(
            ["4", c.space, c.mi_estimator, "", "", "", "spearman_rho", c.spearman_rho, c.spearman_p,
             c.n_tasks, c.seconds, c.error or ""]
        )  # fmt: skip
    for b in ablation.bounds:
        rows.append(
            ["5", b.space, b.mi_estimator, b.jsd_estimator, b.group, b.id_task, "pearson_r", b.pearson_r,
             b.pearson_p, b.n_tasks, b.seconds, b.error or ""]
        )  # fmt: skip
    return csv_table(ABLATION_COLUMNS, rows)


def _spaces_lines(ablation: Ablation) -> list[str]:
    lines = []
    for name, info in ablation.spaces.items():
        spec = info.get("encoders") or {}
        v, t = spec.get("vision") or {}, spec.get("text") or {}
        lines.append(
            f"- `{name}`: vision `{v.get('name')}` ({v.get('feature')}), text `{t.get('name')}` "
            f"({t.get('feature')}, layer {t.get('layer')}); embeddings {info.get('source', '?')}"
        )
    return lines


def to_markdown(ablation: Ablation, *, model: str | None = None, run: str | None = None) -> str:
    """Both tables (MI estimators down, spaces across; each cell the statistic, its p-value, the number of
    tasks and the cell's seconds), the spaces, the fit settings and the paper's ranges."""
    spaces = list(ablation.spaces)
    mis = list(ablation.settings.get("mi_estimators", []))
    jsds = list(ablation.settings.get("jsd_estimators", []))
    fit = ablation.settings.get("fit", {})
    lo4, hi4 = PAPER_RANGES["table4_rho"]
    lo5, hi5 = PAPER_RANGES["table5_r"]
    lines = [f"# EMI estimator × embedding-space ablation{f': {model}' if model else ''}", ""]
    if run:
        lines += [f"Run: `{run}`.", ""]
    lines += [
        f"Every estimator fitted on each space's pooled (query, response) and (query, reference) pairs: "
        f"at most {fit.get('steps')} steps, seed {fit.get('seed')}, early-stopping patience "
        f"{fit.get('patience')}, CLUB fit `{fit.get('method')}`. "
        "Cells: statistic (two-sided p, n tasks, seconds for the cell).",
        "",
        "## Spaces",
        "",
        *_spaces_lines(ablation),
        "",
        "## Table 4: Spearman ρ between EMI and the judge's win rate, across tasks",
        "",
        f"The paper's range over 4 estimators × 3 spaces × 4 LLaVA models: ρ {lo4:.3f}–{hi4:.3f}.",
        "",
    ]
    rows = []
    for mi in mis:
        cells = []
        for s in spaces:
            try:
                c = ablation.cell(s, mi)
            except KeyError:
                cells.append("–")
                continue
            cells.append(_cell_text(c.spearman_rho, c.spearman_p, c.seconds, c.n_tasks, c.error))
        rows.append([mi, *cells])
    lines += markdown_table(["MI estimator", *spaces], rows)
    lines += ["", "## Table 5: Pearson r between EMID and its bound, across the shifted tasks", ""]
    lines += [
        f"The paper's range over 2 JSD × 4 MI estimators × 3 spaces × 4 models: r {lo5:.3f}–{hi5:.3f}.",
        "",
    ]
    if not ablation.groups:
        lines.append("No shift group (an ID task with shifted tasks) in this run: no cells.")
    for group, (id_task, tasks) in ablation.groups.items():
        if len(ablation.groups) > 1:
            lines += [f"### {group} (ID task `{id_task}`, {len(tasks) - 1} shifted tasks)", ""]
        rows = []
        for jsd in jsds:
            for mi in mis:
                cells = []
                for s in spaces:
                    try:
                        b = ablation.bound_cell(s, jsd, mi, group)
                    except KeyError:
                        cells.append("–")
                        continue
                    cells.append(_cell_text(b.pearson_r, b.pearson_p, b.seconds, b.n_tasks, b.error))
                rows.append([jsd, mi, *cells])
        lines += markdown_table(["JSD estimator", "MI estimator", *spaces], rows)
        lines.append("")
    total = sum(c.seconds for c in ablation.agreement) + sum(b.seconds for b in ablation.bounds)
    lines += [f"Cells: {len(ablation.agreement) + len(ablation.bounds)}, {total:.1f} s in all.", ""]
    for w in ablation.warnings:
        lines.append(f"Note: {w}")
    return "\n".join(lines).rstrip() + "\n"


def _heatmap(
    ax: Any, values: list[list[float | None]], rows: Sequence[str], cols: Sequence[str], title: str
) -> Any:
    """One labelled heatmap on ``ax`` (colour scale −1..1, each cell's value written in it); returns the
    image (for the colour bar)."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    image = ax.imshow(data, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            dark = v is not None and abs(v) > 0.6  # white on the saturated colours
            ax.text(
                j,
                i,
                fmt_number(v, 2),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
    ax.set_xlabel("embedding space", fontsize=8)
    ax.set_title(title, fontsize=9)
    return image


def _write_png(ablation: Ablation, path: Path, model: str | None) -> None:
    """Table 4 and Table 5 (first group) as heatmaps side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spaces = list(ablation.spaces)
    mis = list(ablation.settings.get("mi_estimators", []))
    jsds = list(ablation.settings.get("jsd_estimators", []))

    def rho(s: str, mi: str) -> float | None:
        try:
            return ablation.cell(s, mi).spearman_rho
        except KeyError:
            return None

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax4, ax5 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fig.subplots_adjust(left=0.08, right=0.86, bottom=0.2, wspace=0.45)
    image = _heatmap(
        ax4, [[rho(s, mi) for s in spaces] for mi in mis], mis, spaces, "Table 4: Spearman ρ(EMI, win rate)"
    )
    group = next(iter(ablation.groups), None)
    if group is None:
        ax5.text(0.5, 0.5, "no shift group: no Table 5", ha="center", va="center", transform=ax5.transAxes)
        ax5.set_axis_off()
    else:

        def r(s: str, jsd: str, mi: str) -> float | None:
            try:
                return ablation.bound_cell(s, jsd, mi, group).pearson_r
            except KeyError:
                return None

        labels = [f"{jsd} × {mi}" for jsd in jsds for mi in mis]
        values = [[r(s, jsd, mi) for s in spaces] for jsd in jsds for mi in mis]
        more = f" (group {group})" if len(ablation.groups) > 1 else ""
        _heatmap(ax5, values, labels, spaces, f"Table 5: Pearson r(EMID, bound){more}")
    ax4.set_ylabel("MI estimator", fontsize=8)
    ax5.set_ylabel("JSD estimator × MI estimator", fontsize=8)
    fig.colorbar(image, ax=[ax4, ax5], shrink=0.8, label="correlation")
    fig.suptitle(f"{model + ': ' if model else ''}EMI estimator × embedding-space ablation", fontsize=10)
    fig.savefig(path, format="png")


def write_ablation_report(
    ablation: Ablation,
    out_dir: str | os.PathLike,
    *,
    run_id: str,
    model: str | None = None,
    run: str | None = None,
) -> dict[str, Path]:
    """Write ``<run_id>_emi_ablation.{json,csv,md,png}`` into ``out_dir``: staged in a private folder and
    published with hard links that refuse existing names, all or none; when a file of that prefix exists
    (an earlier ablation of the run), ``<run_id>_emi_ablation-2``, ``-3``, ... is used. Returns the paths by
    kind ("json", "csv", "markdown", "png")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model, "run": run, "paper_ranges": PAPER_RANGES, **ablation.to_dict()}
    texts = {
        "json": json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        "csv": to_csv(ablation),
        "markdown": to_markdown(ablation, model=model, run=run),
    }
    suffix = {"json": ".json", "csv": ".csv", "markdown": ".md", "png": ".png"}
    staging = scratch_dir(".emi_staging_", out)
    try:
        for kind, text in texts.items():
            atomic_write_text(staging / f"staged{suffix[kind]}", text)
        atomic_write(staging / "staged.png", lambda tmp: _write_png(ablation, tmp, model))
        for attempt in range(1, 1000):
            prefix = f"{run_id}_{ABLATION_REPORT}" + ("" if attempt == 1 else f"-{attempt}")
            paths = {kind: out / f"{prefix}{ext}" for kind, ext in suffix.items()}
            if any(p.exists() for p in paths.values()):
                continue
            linked: list[Path] = []
            try:
                for kind, target in paths.items():
                    os.link(staging / f"staged{suffix[kind]}", target)
                    linked.append(target)
            except FileExistsError:  # another ablation took the prefix meanwhile: take ours back, next one
                for p in linked:
                    p.unlink(missing_ok=True)
                continue
            except OSError as exc:
                for p in linked:
                    p.unlink(missing_ok=True)
                raise WriteFailed(exc.errno, exc.strerror, str(target)) from None
            return paths
        raise FileExistsError(f"{out}: no free name after {run_id}_{ABLATION_REPORT}-999")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
