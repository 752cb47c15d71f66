"""The merged table (:class:`Leaderboard`, its columns and schema) and its four renderings: JSON, CSV,
Markdown and a PNG (per benchmark: EMI under shift and ID EMI with their intervals, mean and worst EMID, one
line per model in rank order); :func:`write_leaderboard` writes them all or none."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_emi._io import atomic_write
from lmms_emi.errors import UsageError
from lmms_emi.leaderboard.runs import RunResults, encoders_label, estimator_label
from lmms_emi.tables import csv_table, fmt_ci, fmt_number, markdown_table

__all__ = [
    "COLUMNS",
    "DEFAULT_SORT",
    "FILE_NAMES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SHIFT_KINDS",
    "SORTABLE",
    "Leaderboard",
    "check_targets",
    "write_leaderboard",
]

SCHEMA = "lmms-emi-leaderboard"
SCHEMA_VERSION = 2  # 2: the headline emi_ood_mean (+ interval) added and the default sort; run = file id
SHIFT_KINDS: tuple[str, ...] = ("visual", "text", "joint")
#: the stable columns, in order; the extra metric columns go between ``emid_joint`` and ``estimator``
COLUMNS: tuple[str, ...] = (
    "rank",
    "model",
    "run",
    "benchmark",
    "id_task",
    "n_ood_tasks",
    "n_samples",
    "emi_ood_mean",
    "emi_ood_ci_low",
    "emi_ood_ci_high",
    "emi_id",
    "emi_id_ci_low",
    "emi_id_ci_high",
    "emid_mean",
    "emid_worst",
    "emid_worst_task",
    "bound_mean",
    "bound_form",
    "r_emid_bound",
    *(f"emid_{kind}" for kind in SHIFT_KINDS),
    "estimator",
    "encoders",
    "flag",
    "results_file",
)
#: sortable columns and whether higher is better (extra metrics: lmms-eval's ``higher_is_better``)
SORTABLE: dict[str, bool] = {
    "emi_ood_mean": True,
    "emi_ood_ci_low": True,
    "emi_ood_ci_high": True,
    "emi_id": True,
    "emi_id_ci_low": True,
    "emi_id_ci_high": True,
    "emid_mean": False,
    "emid_worst": False,
    "bound_mean": False,
    **{f"emid_{kind}": False for kind in SHIFT_KINDS},
}
#: the headline: EMI under shift (mean over the shifted tasks), higher is better (docs/LEADERBOARD.md)
DEFAULT_SORT = "emi_ood_mean"
FILE_NAMES = {"markdown": "md", "csv": "csv", "json": "json", "png": "png"}
_TITLES = {
    "emi_ood_mean": "EMI under shift",
    "emi_id": "ID EMI",
    "emid_mean": "mean EMID",
    "emid_worst": "worst EMID",
}


@dataclass
class Leaderboard:
    """The merged table: ``rows`` (dicts keyed by ``columns``), the runs, and any comparability problems
    shown because of ``forced``. ``estimator_record``: the estimator every row was scored with when the
    runs were re-scored with one (``--common-estimator``), else None."""

    rows: list[dict[str, Any]]
    columns: list[str]
    runs: list[RunResults]
    sort: str
    problems: dict[Path, list[str]] = field(default_factory=dict)
    forced: bool = False
    notes: list[str] = field(default_factory=list)
    common_estimator: dict[str, Any] | None = None

    @property
    def comparable(self) -> bool:
        return not self.problems

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.columns if c not in COLUMNS]

    def label(self, row: Mapping[str, Any]) -> str:
        """A row's name in the figure: its model, plus its run when the model has several rows of its
        benchmark; ⚠ first when the row is flagged."""
        same = [r for r in self.rows if r["benchmark"] == row["benchmark"] and r["model"] == row["model"]]
        name = str(row["model"]) if len(same) == 1 else f"{row['model']} ({row['run']})"
        return ("⚠ " if row.get("flag") else "") + name

    # -------------------------------------------------------------------------------------- outputs
    def to_json(self) -> str:
        first = self.runs[0]
        payload = {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "columns": self.columns,
            "metric_columns": self.extra_columns,
            "sort": self.sort,
            "comparable": self.comparable,
            "forced": self.forced,
            "problems": [p for ps in self.problems.values() for p in ps],
            "notes": self.notes,
            "estimator": first.estimator if self.comparable else None,
            "common_estimator": self.common_estimator,
            "runs": [
                {
                    "results_file": str(r.path),
                    "model": r.model,
                    "run": r.run,
                    "benchmarks": list(r.analyses),
                    "estimator": r.estimator,
                    "rescored": r.rescored,
                    "problems": self.problems.get(r.path, []),
                }
                for r in self.runs
            ],
            "rows": [{c: row.get(c) for c in self.columns} for row in self.rows],
        }
        return json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"

    def to_csv(self) -> str:
        return csv_table(self.columns, ([row.get(c) for c in self.columns] for row in self.rows))

    def _level(self) -> float | None:
        levels = {
            (a.get("settings") or {}).get("confidence_level") for r in self.runs for a in r.analyses.values()
        }
        level = next(iter(levels)) if len(levels) == 1 else None
        return level if isinstance(level, float) else None

    def to_markdown(self) -> str:
        lines = ["# EMI leaderboard", ""]
        sort = f"`{self.sort}`" + (" (EMI under shift, the headline)" if self.sort == DEFAULT_SORT else "")
        if self.comparable:
            first = self.runs[0]
            rescored = " (re-scored with one estimator fitted on all runs)" if self.common_estimator else ""
            lines.append(
                f"{len(self.runs)} run(s); estimator {estimator_label(first.estimator)}{rescored}; encoders "
                f"{encoders_label(first.encoders)}. Ranked by {sort} within each benchmark."
            )
        else:
            lines.append(
                "**NOT COMPARABLE** (shown with --force): rows marked ⚠ use an estimator of other content or "
                f"other encoders than the first run ({self.runs[0].label}) (list below). Ranked by {sort} "
                "within each benchmark, for reference only."
            )
        lines.append("")
        level = self._level()
        ci = f" [{level:.0%} CI]" if level is not None else " [CI]"
        head = [
            "rank",
            "model",
            "run",
            f"EMI under shift{ci}",
            f"ID EMI{ci}",
            "mean EMID",
            "worst EMID",
            "mean bound",
            "r(EMID, bound)",
        ]
        head += [f"EMID {k}" for k in SHIFT_KINDS] + self.extra_columns
        by_benchmark: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_benchmark.setdefault(row["benchmark"], []).append(row)
        for benchmark, rows in by_benchmark.items():
            ids = sorted({str(r["id_task"]) for r in rows})
            lines += [f"## {benchmark} (ID task {', '.join(ids)})", ""]
            lines += markdown_table(head, [self._markdown_cells(r) for r in rows])
            lines.append("")
        lines.append(
            "EMI in nats (higher: answers more query-relevant than the references). **EMI under shift** = "
            "mean EMI over the shifted tasks (the headline: how good the answers are under shift); ID EMI = "
            "EMI on the in-distribution task; EMID = EMI(ID) − EMI(shifted task), the drop (lower: more "
            "robust), mean / worst over the shifted tasks, per shift type the mean over that type's tasks. "
            "A model that is worse everywhere has little to lose, so a small EMID alone is no merit: read "
            "it beside EMI under shift (docs/LEADERBOARD.md)."
        )
        for problem in (p for ps in self.problems.values() for p in ps):
            lines.append(f"- ⚠ {problem}")
        lines.extend(f"- note: {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def _markdown_cells(self, r: Mapping[str, Any]) -> list[str]:
        def ci(prefix: str) -> tuple[Any, Any] | None:
            low, high = r[f"{prefix}_ci_low"], r[f"{prefix}_ci_high"]
            return (low, high) if low is not None and high is not None else None

        return [
            ("⚠ " if r["flag"] else "") + fmt_number(r["rank"]),
            str(r["model"]),
            str(r["run"]),
            fmt_ci(r["emi_ood_mean"], ci("emi_ood")),
            fmt_ci(r["emi_id"], ci("emi_id")),
            *(fmt_number(r[c]) for c in ("emid_mean", "emid_worst", "bound_mean", "r_emid_bound")),
            *(fmt_number(r[f"emid_{k}"]) for k in SHIFT_KINDS),
            *(fmt_number(r.get(c)) for c in self.extra_columns),
        ]

    def figure(self) -> Any:
        """The PNG's matplotlib Figure: per benchmark two panels sharing one line per row, in rank order
        from the top, named by model (and run): left, EMI under shift (filled) and ID EMI (hollow) with
        their intervals as error bars (higher is better); right, mean EMID (filled) and worst EMID (x)
        (lower is more robust)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global backend change

        benchmarks = list(dict.fromkeys(r["benchmark"] for r in self.rows))
        heights = [max(2.0, 0.45 * sum(r["benchmark"] == b for r in self.rows) + 1.4) for b in benchmarks]
        fig = Figure(figsize=(11.0, sum(heights) + 0.4))
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(len(benchmarks), 2, height_ratios=heights, width_ratios=[1.25, 1.0])
        level = self._level()
        ci = f"{level:.0%} CI" if level is not None else "CI"
        sort_title = _TITLES.get(self.sort, self.sort)
        for i, benchmark in enumerate(benchmarks):
            rows = [r for r in self.rows if r["benchmark"] == benchmark]
            ys = list(range(len(rows)))[::-1]  # rank 1 at the top
            labels = [f"{r['rank'] if r['rank'] is not None else '–'}. {self.label(r)}" for r in rows]
            left = fig.add_subplot(grid[i, 0])
            right = fig.add_subplot(grid[i, 1], sharey=left)
            styles = (
                ("emi_ood", {"marker": "o", "color": "tab:blue", "label": f"EMI under shift ({ci})"}, 0.12),
                (
                    "emi_id",
                    {"marker": "s", "color": "grey", "mfc": "white", "label": f"ID EMI ({ci})"},
                    -0.12,
                ),
            )
            for key, style, shift in styles:
                value = "emi_ood_mean" if key == "emi_ood" else "emi_id"
                pts = [(y + shift, r) for y, r in zip(ys, rows, strict=True) if r[value] is not None]
                # the interval as a capped bar from its low to its high end (a percentile interval need not
                # hold its point estimate, so it is drawn as it is, not as errors around the point)
                bars = [(y, r[f"{key}_ci_low"], r[f"{key}_ci_high"]) for y, r in pts]
                bars = [(y, lo, hi) for y, lo, hi in bars if lo is not None and hi is not None]
                if bars:
                    bar_y, lows, highs = (list(col) for col in zip(*bars, strict=True))
                    left.hlines(bar_y, lows, highs, color=style["color"], lw=1.2)
                    ends = [v for pair in zip(lows, highs, strict=True) for v in pair]
                    left.plot(
                        ends,
                        [y for y in bar_y for _ in (0, 1)],
                        ls="none",
                        marker="|",
                        ms=8,
                        color=style["color"],
                    )
                if pts:
                    left.plot(
                        [r[value] for _, r in pts], [y for y, _ in pts], ls="none", ms=7, zorder=3, **style
                    )
            for key, style in (
                ("emid_mean", {"marker": "o", "color": "tab:red", "label": "mean EMID"}),
                ("emid_worst", {"marker": "x", "color": "black", "label": "worst EMID"}),
            ):
                pts = [(y, r[key]) for y, r in zip(ys, rows, strict=True) if r[key] is not None]
                if pts:
                    right.scatter([v for _, v in pts], [y for y, _ in pts], s=36, **style)
            left.set_yticks(ys, labels)
            right.tick_params(labelleft=False)
            left.set_xlabel("EMI [nats]  (higher: answers more query-relevant)", fontsize=9)
            right.set_xlabel("EMID = EMI(ID) − EMI(shifted)  [nats]  (lower: more robust)", fontsize=9)
            right.axvline(0.0, color="grey", lw=0.6)
            flag = "" if self.comparable else "  (NOT COMPARABLE, --force)"
            left.set_title(f"{benchmark}: ranked by {sort_title}{flag}", fontsize=10, loc="left")
            right.set_title("drop under shift", fontsize=10, loc="left")
            for ax in (left, right):
                ax.grid(axis="x", alpha=0.3)
                ax.set_ylim(-0.7, len(rows) - 0.3)
                handles = ax.get_legend_handles_labels()[0]
                if handles:
                    ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        return fig

    def to_png(self) -> bytes:
        """:meth:`figure` as PNG bytes."""
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=110)
        return buf.getvalue()

    def render(self, kind: str) -> str:
        """The table as text: "markdown", "csv" or "json"."""
        return {"markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}[kind]()


def check_targets(
    out: Path, names: Sequence[str] = (), *, stem: str = "leaderboard", overwrite: bool
) -> dict[str, Path]:
    """The board's files in ``out`` (by kind; ``names``: extra file names, by name); UsageError when ``out``
    is not a folder or, unless ``overwrite``, when one of them exists."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder (--output-path)")
    targets = {kind: out / f"{stem}.{suffix}" for kind, suffix in FILE_NAMES.items()}
    targets.update({name: out / name for name in names})
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise UsageError(
            f"{', '.join(existing)} already exist(s); choose another --output-path or pass --overwrite"
        )
    return targets


def write_leaderboard(
    board: Leaderboard,
    out_dir: str | Path,
    *,
    stem: str = "leaderboard",
    overwrite: bool = False,
    extra: Mapping[str, bytes] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``.csv``, ``.json`` and ``.png`` (and ``extra``: file name -> bytes, e.g. the
    common estimator) into ``out_dir`` atomically; return their paths by kind (an extra file by its name).
    An existing file is refused (UsageError naming it, nothing written) unless ``overwrite``; a failure
    part-way removes the files this call wrote."""
    targets = check_targets(Path(out_dir), list(extra or {}), stem=stem, overwrite=overwrite)
    contents: dict[str, bytes] = {k: board.render(k).encode("utf-8") for k in ("markdown", "csv", "json")}
    contents["png"] = board.to_png()  # everything rendered before the first file is written
    contents.update(extra or {})
    written: list[Path] = []
    try:
        for kind, path in targets.items():
            data = contents[kind]
            atomic_write(path, lambda tmp, data=data: tmp.write_bytes(data), overwrite=overwrite)
            written.append(path)
    except FileExistsError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise UsageError(f"{exc.filename or exc}: appeared while writing; nothing kept") from None
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return targets
