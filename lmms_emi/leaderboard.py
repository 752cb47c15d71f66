"""The leaderboard: several runs' results JSON files (several models, several runs of one model) merged into
one table, one row per (model, run, benchmark). Schema and column definitions: ``docs/LEADERBOARD.md``.

Every number is read from what ``lmms-emi eval`` (or an lmms-eval run with the plugin) merged into lmms-eval's
results JSON: the per-benchmark analyses under ``lmms_emi.benchmarks`` (and the single-task ones under
``lmms_emi.tasks``) and lmms-eval's own per-task metrics under ``results``. Nothing is re-estimated here:
the table only averages and picks values already in the files.

Runs are ranked only when they are comparable: the same estimator (file sha256, checkpoint checksum, registry
name or path, the first of these both runs record) and the same encoders, and no estimator fitted on its own
run. Otherwise :func:`build_leaderboard` raises a :class:`~lmms_emi.errors.UsageError` naming what differs,
unless ``force`` (then the rows are flagged).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_emi._io import atomic_write
from lmms_emi.errors import UsageError
from lmms_emi.metrics import FILTER, METRICS

__all__ = [
    "COLUMNS",
    "DEFAULT_SORT",
    "FILE_NAMES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SHIFT_KINDS",
    "SORTABLE",
    "Leaderboard",
    "RunResults",
    "build_leaderboard",
    "comparability_problems",
    "encoders_label",
    "estimator_label",
    "find_results_files",
    "load_run",
    "write_leaderboard",
]

SCHEMA = "lmms-emi-leaderboard"
SCHEMA_VERSION = 1
SHIFT_KINDS: tuple[str, ...] = ("visual", "text", "joint")
RESULTS_GLOB = "*_results.json"

#: the stable columns, in order; the extra metric columns go between ``emid_joint`` and ``estimator``
COLUMNS: tuple[str, ...] = (
    "rank",
    "model",
    "run",
    "benchmark",
    "id_task",
    "n_ood_tasks",
    "n_samples",
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
_EXTRA_AT = COLUMNS.index("estimator")
#: sortable columns and whether higher is better (extra metrics: lmms-eval's ``higher_is_better``)
SORTABLE: dict[str, bool] = {
    "emi_id": True,
    "emi_id_ci_low": True,
    "emi_id_ci_high": True,
    "emid_mean": False,
    "emid_worst": False,
    "bound_mean": False,
    **{f"emid_{kind}": False for kind in SHIFT_KINDS},
}
DEFAULT_SORT = "emid_mean"
FILE_NAMES = {"markdown": "md", "csv": "csv", "json": "json", "png": "png"}
#: the EMI metrics: their per-task values are summarised by the stable columns, not as metric columns
_EMI_METRICS = frozenset(m.name for m in METRICS if m.name.startswith("emi"))
_AGGREGATION = {m.name: m.group for m in METRICS}  # other metrics of the table: their group aggregation


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _mean(values: Iterable[Any]) -> float | None:
    xs = [v for v in (_finite(x) for x in values) if v is not None]
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------------ inputs
def find_results_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The results files named by ``inputs``: files as given, folders searched recursively for
    ``*_results.json`` (sorted); duplicates dropped. UsageError for a missing path or an empty folder."""
    if not inputs:
        raise UsageError("no runs given: name lmms-eval results JSON files or the folders holding them")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob(RESULTS_GLOB) if p.is_file())
            if not found:
                raise UsageError(
                    f"{path}: no {RESULTS_GLOB} file in this folder (an lmms-eval --output_path?)"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    seen: set[Path] = set()
    out = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


@dataclass(frozen=True)
class RunResults:
    """One run's results JSON: its model name, run label and the parts the leaderboard reads."""

    path: Path
    model: str
    run: str
    data: dict[str, Any]

    @property
    def emi(self) -> dict[str, Any]:
        return self.data["lmms_emi"]

    @property
    def estimator(self) -> dict[str, Any]:
        return self.emi.get("estimator") or {}

    @property
    def encoders(self) -> dict[str, Any]:
        return self.estimator.get("encoders") or {}

    @property
    def analyses(self) -> dict[str, dict[str, Any]]:
        """Benchmark (or single task) -> its analysis dict (``ShiftAnalysis.to_dict``)."""
        return {**(self.emi.get("benchmarks") or {}), **(self.emi.get("tasks") or {})}

    @property
    def label(self) -> str:
        return f"{self.path} (model {self.model})"


def load_run(path: str | Path) -> RunResults:
    """Read one results JSON; UsageError when it is not lmms-eval's results or holds no EMI."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: not an lmms-eval results JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "config" not in data:
        raise UsageError(f"{path}: not an lmms-eval results JSON (no 'results' and 'config' sections)")
    emi = data.get("lmms_emi")
    analyses = {**(emi.get("benchmarks") or {}), **(emi.get("tasks") or {})} if isinstance(emi, dict) else {}
    if not analyses or not all(isinstance(a, dict) and a.get("tasks") for a in analyses.values()):
        raise UsageError(
            f"{path}: this run has no EMI (run it with `lmms-emi eval`, an lmms-emi shift task, or "
            "--metrics emi)"
        )
    return RunResults(path, _model_name(data, analyses), _run_label(path, data), data)


def _model_name(data: Mapping[str, Any], analyses: Mapping[str, Mapping[str, Any]]) -> str:
    for analysis in analyses.values():
        name = (analysis.get("metadata") or {}).get("model")
        if name:
            return str(name)
    config = data.get("config") or {}
    return str(data.get("model_name") or config.get("model") or "unknown")


def _run_label(path: Path, data: Mapping[str, Any]) -> str:
    date = data.get("date")
    if isinstance(date, str) and date:
        return date
    return path.name.removesuffix("_results.json").removesuffix(".json")


# --------------------------------------------------------------------------------------- comparability
def _estimator_keys(est: Mapping[str, Any]) -> dict[str, str]:
    """Identity keys of an estimator, strongest first: file sha256, checkpoint checksum, name, path."""
    keys = {
        "sha256": est.get("sha256"),
        "checksum": (est.get("manifest") or {}).get("tensors_sha256"),
        "name": est.get("name"),
        "path": est.get("path"),
    }
    return {k: str(v) for k, v in keys.items() if v}


def estimator_label(est: Mapping[str, Any]) -> str:
    """A short name for an estimator: its registry name, else its file, with its sha256 prefix."""
    keys = _estimator_keys(est)
    head = keys.get("name") or (Path(keys["path"]).name if "path" in keys else est.get("source") or "?")
    if "sha256" in keys:
        return f"{head} (sha256 {keys['sha256'][:12]})"
    return f"{head} (tensors sha256 {keys['checksum'][:12]})" if "checksum" in keys else str(head)


def _same_estimator(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    ka, kb = _estimator_keys(a), _estimator_keys(b)
    for key in ("sha256", "checksum", "name", "path"):
        if key in ka and key in kb:
            return ka[key] == kb[key]
    return False


def _dict_diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out.extend(_dict_diff(a.get(key), b.get(key), f"{prefix}.{key}"))
        return out
    return [] if a == b else [f"{prefix} {a!r} vs {b!r}"]


def encoders_label(enc: Mapping[str, Any]) -> str:
    parts = [f"{side} {(enc.get(side) or {}).get('name')}" for side in ("vision", "text") if enc.get(side)]
    return ", ".join(parts) or "unknown"


def comparability_problems(runs: Sequence[RunResults]) -> dict[Path, list[str]]:
    """Why each run cannot be ranked with the first one: another estimator, other encoders, or an estimator
    fitted on its own run (only when there are several runs). Empty when all are comparable."""
    problems: dict[Path, list[str]] = {}
    if len(runs) < 2:
        return problems
    ref = runs[0]
    for run in runs:
        found = []
        if not _estimator_keys(run.estimator):
            found.append(f"{run.label} does not record its estimator (no name, sha256 or path)")
        elif run.estimator.get("comparability") == "run":
            found.append(
                f"{run.label}: its estimator was fitted on its own run (EMI comparable only within it)"
            )
        if (
            run is not ref
            and _estimator_keys(run.estimator)
            and not _same_estimator(ref.estimator, run.estimator)
        ):
            found.append(
                f"estimator differs: {ref.label} uses {estimator_label(ref.estimator)}, {run.label} uses "
                f"{estimator_label(run.estimator)}"
            )
        if run is not ref:
            diff = _dict_diff(ref.encoders, run.encoders, "encoders")
            if diff:
                found.append(f"encoders differ: {ref.label} vs {run.label}: {'; '.join(diff)}")
        if found:
            problems[run.path] = found
    return problems


# ------------------------------------------------------------------------------------------------ rows
def _metric_column(name: str, filt: str) -> str:
    col = name if filt == FILTER else f"{name}@{filt}"
    return f"metric_{col}" if col in COLUMNS else col


def _is_extra_metric(name: str) -> bool:
    return (
        name not in _EMI_METRICS
        and not name.startswith("emid_pearson")
        and not name.endswith("_stderr")
        and "_stderr_" not in name
    )


def _extra_metrics(run: RunResults, tasks: Sequence[str]) -> tuple[dict[str, float | None], dict[str, bool]]:
    """Other per-task metrics of lmms-eval's results (a judge's ``winrate,none``, ...): column -> mean over
    the tasks that report a finite value (the sum for a metric whose group aggregation in the metric table
    is "sum"); and column -> higher is better."""
    values: dict[str, list[float]] = {}
    higher: dict[str, bool] = {}
    sums: dict[str, bool] = {}
    results = run.data.get("results") or {}
    hib = run.data.get("higher_is_better") or {}
    for task in tasks:
        entry = results.get(task)
        if not isinstance(entry, Mapping):
            continue
        for key, value in entry.items():
            name, sep, filt = str(key).partition(",")
            if not sep or not _is_extra_metric(name) or _finite(value) is None:
                continue
            col = _metric_column(name, filt)
            values.setdefault(col, []).append(float(value))
            higher.setdefault(col, bool((hib.get(task) or {}).get(name, True)))
            sums.setdefault(col, _AGGREGATION.get(name) == "sum")
    return {c: sum(v) if sums[c] else _mean(v) for c, v in values.items()}, higher


def _rows_of(run: RunResults, flags: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    rows: list[dict[str, Any]] = []
    directions: dict[str, bool] = {}
    for benchmark, analysis in run.analyses.items():
        tasks = [t for t in analysis.get("tasks") or [] if isinstance(t, Mapping)]
        id_task = analysis.get("id_task")
        id_row = next((t for t in tasks if t.get("task") == id_task), None)
        ood = [t for t in tasks if t.get("task") != id_task]
        scaled = (analysis.get("settings") or {}).get("entropy_scale") is not None
        bound_key = "bound_theorem" if scaled else "bound"
        emids = [(t.get("task"), _finite(t.get("emid"))) for t in ood]
        emids = [(name, v) for name, v in emids if v is not None]
        worst = max(emids, key=lambda p: p[1]) if emids else (None, None)
        corr = (analysis.get("correlations") or {}).get(bound_key) or {}
        ci = (id_row or {}).get("emi_ci") or (None, None)
        extras, higher = _extra_metrics(run, [str(t.get("task")) for t in tasks])
        directions.update(higher)
        row: dict[str, Any] = {
            "rank": None,
            "model": run.model,
            "run": run.run,
            "benchmark": benchmark,
            "id_task": id_task,
            "n_ood_tasks": len(ood),
            "n_samples": sum(int(t.get("n") or 0) for t in tasks),
            "emi_id": _finite((id_row or {}).get("emi")),
            "emi_id_ci_low": _finite(ci[0]),
            "emi_id_ci_high": _finite(ci[1]),
            "emid_mean": _mean(v for _, v in emids),
            "emid_worst": worst[1],
            "emid_worst_task": worst[0],
            "bound_mean": _mean(t.get(bound_key) for t in ood),
            "bound_form": ("theorem" if scaled else "scale-adjusted") if ood else None,
            "r_emid_bound": _finite(corr.get("pearson_r")),
            **{
                f"emid_{kind}": _mean(t.get("emid") for t in ood if t.get("shift_kind") == kind)
                for kind in SHIFT_KINDS
            },
            **extras,
            "estimator": estimator_label(run.estimator),
            "encoders": encoders_label(run.encoders),
            "flag": "; ".join(flags) or None,
            "results_file": str(run.path),
        }
        rows.append(row)
    return rows, directions


def _rank(rows: list[dict[str, Any]], sort: str, higher_is_better: bool) -> list[dict[str, Any]]:
    """Rows grouped by benchmark (first-seen order), each group ordered by ``sort``; equal values share a
    rank, rows without a value come last, unranked."""
    order: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        order.setdefault(row["benchmark"], []).append(row)
    out: list[dict[str, Any]] = []
    sign = -1.0 if higher_is_better else 1.0
    for group in order.values():
        valued = sorted((r for r in group if _finite(r.get(sort)) is not None), key=lambda r: sign * r[sort])
        prev, rank = None, 0
        for i, row in enumerate(valued, start=1):
            if row[sort] != prev:
                rank, prev = i, row[sort]
            row["rank"] = rank
        out.extend(valued)
        out.extend(r for r in group if _finite(r.get(sort)) is None)
    return out


@dataclass
class Leaderboard:
    """The merged table: ``rows`` (dicts keyed by ``columns``), the runs, and any comparability problems
    shown because of ``forced``."""

    rows: list[dict[str, Any]]
    columns: list[str]
    runs: list[RunResults]
    sort: str
    problems: dict[Path, list[str]] = field(default_factory=dict)
    forced: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        return not self.problems

    @property
    def extra_columns(self) -> list[str]:
        return [c for c in self.columns if c not in COLUMNS]

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
            "runs": [
                {
                    "results_file": str(r.path),
                    "model": r.model,
                    "run": r.run,
                    "benchmarks": list(r.analyses),
                    "estimator": r.estimator,
                    "problems": self.problems.get(r.path, []),
                }
                for r in self.runs
            ],
            "rows": [{c: row.get(c) for c in self.columns} for row in self.rows],
        }
        return json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in self.columns})
        return buf.getvalue()

    def to_markdown(self) -> str:
        lines = ["# EMI leaderboard", ""]
        if self.comparable:
            first = self.runs[0]
            lines.append(
                f"{len(self.runs)} run(s); estimator {estimator_label(first.estimator)}; encoders "
                f"{encoders_label(first.encoders)}. Ranked by `{self.sort}` within each benchmark."
            )
        else:
            lines.append(
                "**NOT COMPARABLE** (shown with --force): rows marked ⚠ use another estimator or other "
                f"encoders than the first run ({self.runs[0].label}), or an estimator fitted on their own "
                f"run (list below). Ranked by `{self.sort}` within each benchmark, for reference only."
            )
        lines.append("")
        levels = {
            (a.get("settings") or {}).get("confidence_level") for r in self.runs for a in r.analyses.values()
        }
        level = next(iter(levels)) if len(levels) == 1 else None
        head = [
            "rank",
            "model",
            "run",
            f"ID EMI [{level:.0%} CI]" if isinstance(level, float) else "ID EMI [CI]",
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
            lines += ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
            for r in rows:
                ci = (
                    f" [{_fmt(r['emi_id_ci_low'])}, {_fmt(r['emi_id_ci_high'])}]"
                    if r["emi_id_ci_low"] is not None
                    else ""
                )
                cells = [
                    ("⚠ " if r["flag"] else "") + _fmt(r["rank"]),
                    str(r["model"]),
                    str(r["run"]),
                    _fmt(r["emi_id"]) + ci,
                    _fmt(r["emid_mean"]),
                    _fmt(r["emid_worst"]),
                    _fmt(r["bound_mean"]),
                    _fmt(r["r_emid_bound"]),
                    *(_fmt(r[f"emid_{k}"]) for k in SHIFT_KINDS),
                    *(_fmt(r.get(c)) for c in self.extra_columns),
                ]
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            lines.append("")
        lines.append(
            "EMI in nats (higher: answers more query-relevant); EMID = EMI(ID) − EMI(shifted task), lower is "
            "more robust; mean / worst over the shifted tasks; per shift type: mean over that type's tasks."
        )
        for problem in (p for ps in self.problems.values() for p in ps):
            lines.append(f"- ⚠ {problem}")
        lines.extend(f"- note: {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def to_png(self) -> bytes:
        """Grouped bars: mean EMID per shift type (x) per model and run (bars), one panel per benchmark."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no global backend change

        benchmarks = list(dict.fromkeys(r["benchmark"] for r in self.rows))
        fig = Figure(figsize=(max(6.4, 2.2 * len(SHIFT_KINDS) + 0.4 * len(self.rows)), 4.2 * len(benchmarks)))
        FigureCanvasAgg(fig)
        models = [r["model"] for r in self.rows]
        for i, benchmark in enumerate(benchmarks, start=1):
            ax = fig.add_subplot(len(benchmarks), 1, i)
            rows = [r for r in self.rows if r["benchmark"] == benchmark]
            width = 0.8 / max(len(rows), 1)
            for j, r in enumerate(rows):
                label = r["model"] if models.count(r["model"]) == 1 else f"{r['model']} ({r['run']})"
                values = [r[f"emid_{k}"] for k in SHIFT_KINDS]
                xs = [k + (j - (len(rows) - 1) / 2) * width for k in range(len(SHIFT_KINDS))]
                ys = [math.nan if v is None else v for v in values]
                ax.bar(xs, ys, width=width, label=("⚠ " if r["flag"] else "") + label)
            ax.set_xticks(range(len(SHIFT_KINDS)), [f"{k} shift" for k in SHIFT_KINDS])
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_ylabel("mean EMID [nats]  (lower: more robust)", fontsize=9)
            title = f"{benchmark}: EMID per shift type"
            ax.set_title(title + ("" if self.comparable else "  (NOT COMPARABLE, --force)"), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        return buf.getvalue()

    def render(self, kind: str) -> str:
        """The table as text: "markdown", "csv" or "json"."""
        return {"markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}[kind]()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# ------------------------------------------------------------------------------------------ the table
def build_leaderboard(
    inputs: Sequence[str | Path], *, force: bool = False, sort: str = DEFAULT_SORT
) -> Leaderboard:
    """Read the runs named by ``inputs`` and merge them into one :class:`Leaderboard`.

    UsageError (one line) for zero runs, a file that is not an lmms-eval results JSON, a run without EMI,
    an unknown sort column, or runs that are not comparable (unless ``force``: then shown, flagged)."""
    runs = [load_run(p) for p in find_results_files(inputs)]
    problems = comparability_problems(runs)
    if problems and not force:
        flat = [p for ps in problems.values() for p in ps]
        more = f" (and {len(flat) - 2} more)" if len(flat) > 2 else ""
        raise UsageError(
            f"cannot rank these runs: {' | '.join(flat[:2])}{more}; evaluate every run with the same frozen "
            "estimator (--estimator; `lmms-emi train-estimator` makes one) and encoders, or pass --force to "
            "show them anyway, flagged"
        )
    rows: list[dict[str, Any]] = []
    directions: dict[str, bool] = {}
    for run in runs:
        flags = ["not comparable: " + " | ".join(problems[run.path])] if run.path in problems else []
        run_rows, higher = _rows_of(run, flags)
        rows.extend(run_rows)
        for col, hib in higher.items():
            directions.setdefault(col, hib)
    # the same model and run label twice (two folders, same second): tell them apart
    seen: dict[tuple[str, str, str], int] = {}
    for row in rows:
        key = (row["model"], row["run"], row["benchmark"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            row["run"] = f"{row['run']}#{seen[key]}"
    extras = sorted({c for r in rows for c in r if c not in COLUMNS})
    columns = [*COLUMNS[:_EXTRA_AT], *extras, *COLUMNS[_EXTRA_AT:]]
    sortable = {**SORTABLE, **{c: directions.get(c, True) for c in extras}}
    if sort not in sortable:
        raise UsageError(f"cannot sort by {sort!r}; choose one of {', '.join(sortable)}")
    for row in rows:
        for col in extras:
            row.setdefault(col, None)
    notes = []
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        forms = {r["bound_form"] for r in rows if r["benchmark"] == benchmark and r["bound_form"]}
        if len(forms) > 1:
            notes.append(f"{benchmark}: the runs use different bound forms ({', '.join(sorted(forms))})")
    levels = {
        (a.get("settings") or {}).get("confidence_level") for r in runs for a in r.analyses.values()
    } - {None}
    if len(levels) > 1:
        notes.append(f"the runs' EMI intervals have different confidence levels ({sorted(levels)})")
    ranked = _rank(rows, sort, sortable[sort])
    return Leaderboard(ranked, columns, runs, sort, problems, force, notes)


def write_leaderboard(
    board: Leaderboard, out_dir: str | Path, *, stem: str = "leaderboard", overwrite: bool = False
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``.csv``, ``.json`` and ``.png`` into ``out_dir`` atomically; return their paths
    by kind. An existing file is refused (UsageError naming it, nothing written) unless ``overwrite``; a
    failure part-way removes the files this call wrote."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder (--output-path)")
    targets = {kind: out / f"{stem}.{suffix}" for kind, suffix in FILE_NAMES.items()}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise UsageError(
            f"{', '.join(existing)} already exist(s); choose another --output-path or pass --overwrite"
        )
    contents: dict[str, bytes] = {k: board.render(k).encode("utf-8") for k in ("markdown", "csv", "json")}
    contents["png"] = board.to_png()  # everything rendered before the first file is written
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
