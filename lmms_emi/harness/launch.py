"""``lmms-emi eval``, harness side: lmms-eval with the plugin's tasks visible, then the run's records
through the one pipeline, the reports, and the final numbers merged into lmms-eval's results JSON.

:func:`run_eval` takes the parsed EMI options (see :mod:`lmms_emi.cli.eval`) and lmms-eval's own arguments:

1. plans the run: the plugin's task folder goes into lmms-eval's ``include_path`` (injected through the
   ``argparse.Namespace`` that ``lmms_eval.__main__.cli_evaluate`` merges over the parsed argv, so nobody
   types ``--include_path``); with ``--data`` a copy of the task tree whose ``_dataset.yaml`` points at the
   local copy is used instead; a run of shifted tasks gets its benchmark's ID task added (EMID needs it);
   ``--metrics emi`` attaches the EMI metric to other lmms-eval tasks;
2. exports the EMI options (``$LMMS_EMI_OPTIONS``) for the run session of every process, and checks a named
   estimator before any generation;
3. runs ``cli_evaluate`` in this process, recording the exception or results of ``cli_evaluate_single``
   (lmms-eval logs errors and returns normally, so a failed run would otherwise look successful);
4. on rank 0: :meth:`RunSession.finalize` (the one pipeline), :func:`lmms_emi.report.write_run_reports`
   next to the results JSON, and the final numbers merged into that JSON (atomic rewrite).
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import functools
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_emi import scenarios as sc
from lmms_emi.errors import EXIT_OK, RunFailedError, UsageError
from lmms_emi.harness import foreign, make_tasks, overrides, session
from lmms_emi.harness.options import EMIOptions
from lmms_emi.harness.replay import REPLAY_MODEL, model_manifests
from lmms_emi.harness.results import rewrite_results_file
from lmms_emi.paths import tasks_dir
from lmms_emi.report import write_run_reports
from lmms_emi.sources.datasets import LocalDataset
from lmms_emi.sources.run_folder import model_name

__all__ = ["DEFAULT_OUTPUT", "LIST_COMMANDS", "TaskPlan", "describe_error", "plan_tasks", "run_eval"]

DEFAULT_OUTPUT = "emi_results"
LIST_COMMANDS = ("list", "list_groups", "list_tags", "list_subtasks")


def lmms_peek(argv: list[str]) -> argparse.Namespace:
    """The lmms-eval arguments the launcher needs to read or rewrite."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--tasks", "--output_path", "--include_path", "--model", "--model_args", "--config"):
        p.add_argument(name)
    p.add_argument("--log_samples", action="store_true")
    known, _ = p.parse_known_args(argv)
    return known


def set_arg(argv: list[str], name: str, value: str | None) -> list[str]:
    """``argv`` with ``name`` set to ``value`` (removed when None); handles ``--x v`` and ``--x=v``."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name:
            skip = i + 1 < len(argv)
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    if value is not None:
        out += [name, value]
    return out


# ------------------------------------------------------------------------------------------- task plan
def plugin_names() -> dict[str, str]:
    """Every task and group name of the plugin -> its benchmark."""
    names = {s.task: s.benchmark for b in sc.TASK_PREFIX for s in sc.scenarios(b)}
    names.update({g: b for g, (b, _kind) in make_tasks.all_group_names().items()})
    return names


@dataclass
class TaskPlan:
    tasks: list[str]  # what goes to lmms-eval's --tasks
    benchmarks: set[str] = field(default_factory=set)
    foreign: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    leaves: list[str] = field(default_factory=list)  # the plugin tasks the run evaluates (groups expanded)


def _group_leaves(name: str) -> list[str]:
    """The plugin tasks of a plugin task or group name."""
    groups = make_tasks.all_group_names()
    if name not in groups:
        return [name]
    benchmark, kind = groups[name]
    scen = sc.scenarios(benchmark)
    if kind is None:
        return [s.task for s in scen]
    return [s.task for s in scen if s.shift_kind == kind]


def plan_tasks(tasks_arg: str) -> TaskPlan:
    """Resolve ``--tasks``: the plugin's names (wildcards too), unknown plugin-looking names (error), other
    lmms-eval tasks (foreign); add each touched benchmark's ID task when the run lacks it."""
    ours = plugin_names()
    requested = [t.strip() for t in tasks_arg.split(",") if t.strip()]
    plan = TaskPlan(tasks=[])
    covered: set[str] = set()  # benchmarks whose ID task is in the run
    for name in requested:
        matched = (
            [n for n in ours if fnmatch.fnmatchcase(n, name)]
            if "*" in name
            else ([name] if name in ours else [])
        )
        if not matched:
            if name.startswith(tuple(sc.TASK_PREFIX.values())) or name.startswith("llavabench_shift"):
                close = difflib.get_close_matches(name, list(ours), n=3)
                hint = (
                    f"; did you mean {', '.join(close)}?" if close else "; see `lmms-emi eval --tasks list`"
                )
                raise UsageError(f"unknown task {name!r}{hint}")
            plan.foreign.append(name)
            plan.tasks.append(name)
            continue
        plan.tasks.extend(n for n in matched if n not in plan.tasks)  # wildcards expanded
        for n in matched:
            benchmark = ours[n]
            plan.benchmarks.add(benchmark)
            if n in (sc.id_scenario(benchmark).task, sc.GROUP_NAME[benchmark]):
                covered.add(benchmark)
    for benchmark in sorted(plan.benchmarks - covered):
        id_task = sc.id_scenario(benchmark).task
        plan.tasks.append(id_task)
        plan.added.append(id_task)
    for name in plan.tasks:
        if name not in plan.foreign:
            plan.leaves.extend(t for t in _group_leaves(name) if t not in plan.leaves)
    return plan


def check_local_splits(plan: TaskPlan, data: Mapping[str, LocalDataset]) -> None:
    """Every task of a benchmark read from a local copy must find its split there."""
    for task in plan.leaves:
        scenario = sc.scenario_for_task(task)
        if scenario is None or scenario.benchmark not in data:
            continue
        local = data[scenario.benchmark]
        splits = local.splits
        if scenario.split not in splits:
            where = local.path if local.kwargs.get("load_from_disk") else "the parquet files given"
            raise UsageError(
                f"task {task}: split {scenario.split} is not in the local copy {where} "
                f"({len(splits)} splits there, e.g. {', '.join(splits[:3])})"
            )


# ------------------------------------------------------------------------------------------- errors
def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        last = getattr(exc, "last_attempt", None)  # tenacity.RetryError around process_results
        inner = last.exception() if last is not None and hasattr(last, "exception") else None
        exc = inner or exc.__cause__ or exc.__context__
    return chain


def _dataset_frame(exc: BaseException) -> tuple[str, str] | None:
    """(task, dataset path) when ``exc`` was raised while lmms-eval loaded a task's dataset."""
    for e in _exception_chain(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            if frame.f_code.co_name == "download" and frame.f_code.co_filename.endswith(
                os.path.join("api", "task.py")
            ):
                task_obj = frame.f_locals.get("self")
                task = getattr(getattr(task_obj, "config", None), "task", "?")
                return str(task), str(getattr(task_obj, "DATASET_PATH", "?"))
    return None


def describe_error(exc: BaseException) -> str:
    """One line for an exception of a run."""
    chain = _exception_chain(exc)
    root = chain[-1]
    first = (str(root).strip().splitlines() or [""])[0]
    for e in chain:
        text = str(e)
        if isinstance(e, ValueError) and text.startswith("Tasks not found"):
            names = text.split(":", 1)[1].split(". Try")[0].strip()
            return f"unknown task(s): {names}; see `lmms-emi eval --tasks list`"
    loading = _dataset_frame(exc)
    if loading is not None:
        task, dataset = loading
        benchmark = next((b for b in sc.TASK_PREFIX if task.startswith(sc.TASK_PREFIX[b])), None)
        how = f"--data {benchmark}=PATH" if benchmark else "a local dataset path"
        return (
            f"dataset {dataset} of task {task} is not reachable ({type(root).__name__}: {first}); "
            f"it needs the Hugging Face hub (network access) or a local copy given with {how}"
        )
    return (
        f"{type(root).__name__}: {first}"
        if not isinstance(root, (ValueError, RuntimeError)) or not first
        else first
    )


# ------------------------------------------------------------------------------------------- lmms-eval
def _call_lmms_eval(
    lmms_args: list[str], include_paths: list[str], *, builtin_tasks: bool = True
) -> tuple[dict | None, BaseException | None, str | None]:
    """Run ``lmms_eval.__main__.cli_evaluate`` here with ``include_paths``; (results on rank 0, exception,
    the output path it used).

    ``builtin_tasks=False`` makes its TaskManager skip lmms-eval's own ~2000 task YAMLs."""
    import lmms_eval.__main__ as lmms_main

    captured: dict[str, Any] = {}
    original = lmms_main.cli_evaluate_single
    original_manager = lmms_main.TaskManager
    if not builtin_tasks:
        lmms_main.TaskManager = functools.partial(original_manager, include_defaults=False)

    def recording(args: argparse.Namespace) -> Any:
        try:
            out = original(args)
        except Exception as exc:
            captured["error"] = exc
            raise
        captured["results"] = out[0] if isinstance(out, tuple) else out
        captured["output_path"] = getattr(args, "output_path", None)
        return out

    saved_argv = sys.argv
    lmms_main.cli_evaluate_single = recording
    sys.argv = ["lmms-eval", *lmms_args]
    try:
        lmms_main.cli_evaluate(argparse.Namespace(include_path=include_paths))
    finally:
        lmms_main.cli_evaluate_single = original
        lmms_main.TaskManager = original_manager
        sys.argv = saved_argv
    return captured.get("results"), captured.get("error"), captured.get("output_path")


def _register_replay_model() -> None:
    """Make ``emi_replay`` resolvable in this process also when the plugin is not installed (a checkout):
    installed, lmms-eval finds it through the ``lmms_eval.models`` entry point."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    if REPLAY_MODEL not in MODEL_REGISTRY_V2.list_model_names():
        for manifest in model_manifests():
            MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


def _find_results_file(output_path: str, since: float) -> Path | None:
    root = Path(output_path)
    found = (
        [p for p in root.rglob("*_results.json") if p.stat().st_mtime >= since - 1.0] if root.is_dir() else []
    )
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _summary(results: dict[str, Any]) -> str:
    """A short plain-text table of the EMI numbers."""

    def f(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, (int, float)) else "-"

    lines = [f"{'task':<58} {'n':>4} {'EMI':>8} {'95% CI':>19} {'EMID':>8} {'bound':>8}"]
    emi_tasks = results.get("lmms_emi", {})
    for task, entry in results.get("results", {}).items():
        if "emi,none" not in entry or (
            task in results.get("group_subtasks", {}) and results["group_subtasks"][task]
        ):
            continue
        ci = f"[{f(entry.get('emi_ci_low,none'))}, {f(entry.get('emi_ci_high,none'))}]"
        lines.append(
            f"{task:<58} {entry.get('emi_n,none', ''):>4} {f(entry.get('emi,none')):>8} {ci:>19} "
            f"{f(entry.get('emid,none')):>8} {f(entry.get('emid_bound,none')):>8}"
        )
    for group, entry in results.get("groups", {}).items():
        if "emid_pearson,none" in entry:
            lines.append(
                f"{group}: Pearson r(EMID, bound) = {f(entry['emid_pearson,none'])} over "
                f"{entry.get('emid_pairs')} OOD tasks; r(EMID, partial bound) = "
                f"{f(entry.get('emid_pearson_partial,none'))}"
            )
    est = emi_tasks.get("estimator") or {}
    if est.get("comparability") == "run":
        lines.append(
            "note: " + est.get("note", "estimator fitted on this run: EMI comparable only within it")
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- entry point
def run_eval(
    options: EMIOptions,
    lmms_args: list[str],
    *,
    data_args: list[str],
    metrics: str | None,
    builtin_tasks: bool = True,
) -> int:
    """Run lmms-eval with ``lmms_args`` and the EMI ``options``; return the exit status (raises
    :class:`~lmms_emi.errors.LmmsEmiError` for a problem the user can fix)."""
    with tempfile.TemporaryDirectory(prefix="lmms_emi_run_") as run_dir:
        return _run_eval(options, list(lmms_args), Path(run_dir), data_args, metrics, builtin_tasks)


def _run_eval(
    opts: EMIOptions,
    lmms_args: list[str],
    run_dir: Path,
    data_args: list[str],
    metrics: str | None,
    builtin_tasks: bool,
) -> int:
    peek = lmms_peek(lmms_args)
    rank = int(os.environ.get("RANK", "0"))
    if not peek.tasks and not peek.config:
        raise UsageError("give the tasks to run with --tasks (e.g. --tasks llavabench_shift_synthetic)")
    data = overrides.parse_data_args(data_args)
    if opts.estimator and opts.estimator != "fit" and not Path(opts.estimator).is_file():
        raise UsageError(f"--estimator {opts.estimator}: no such file")
    opts.settings()  # validates the analysis and estimator options before any generation
    opts.policy()
    if metrics and metrics.strip().lower() != "emi":
        raise UsageError(f"--metrics {metrics}: only 'emi' is supported")

    include_paths = [str(overrides.build_include_dir(run_dir, data, tasks_dir()) if data else tasks_dir())]
    if peek.include_path:
        include_paths.append(peek.include_path)
    lmms_args = set_arg(lmms_args, "--include_path", None)

    opts.to_env()
    run = session.reset(opts)
    plan = None
    if peek.tasks and peek.tasks not in LIST_COMMANDS and not os.path.exists(peek.tasks):
        plan = plan_tasks(peek.tasks)
        check_local_splits(plan, data)
        if plan.added and rank == 0:
            print(
                f"lmms-emi: adding the ID task {', '.join(plan.added)} (EMID is measured against it)",
                file=sys.stderr,
            )
        if plan.foreign and metrics:
            folder = foreign.prepare(run, plan, run_dir, include_paths, builtin_tasks=builtin_tasks)
            lmms_args = set_arg(lmms_args, "--tasks", str(folder))
        else:
            lmms_args = set_arg(lmms_args, "--tasks", ",".join(plan.tasks))
    output_path = peek.output_path
    if plan is not None and not output_path:
        output_path = DEFAULT_OUTPUT
        lmms_args = set_arg(lmms_args, "--output_path", output_path)
        if rank == 0:
            print(
                f"lmms-emi: writing results under ./{DEFAULT_OUTPUT} (set --output_path to change)",
                file=sys.stderr,
            )

    if plan is not None and rank == 0:
        # the encoders' configs are read (no weights): an unreachable encoder fails before generation with
        # the Embedder's one-line EncoderLoadError
        run.encoder_spec()
    if opts.estimator and opts.estimator != "fit" and plan is not None and rank == 0:
        try:  # fail before the (long) generation when the checkpoint does not fit the encoders
            run.fixed_estimator()
        except ValueError as exc:  # a checkpoint / encoder mismatch
            raise UsageError(f"--estimator {opts.estimator}: {exc}") from None
        except Exception as exc:  # e.g. an encoder that cannot be loaded
            raise UsageError(describe_error(exc)) from None

    _register_replay_model()
    started = time.time()
    results, error, used_output = _call_lmms_eval(lmms_args, include_paths, builtin_tasks=builtin_tasks)
    if error is not None:
        raise RunFailedError(describe_error(error))
    if rank != 0 or (plan is None and not run.tasks()):
        return EXIT_OK  # other ranks, --tasks list, or a run without the EMI metric
    if results is None:
        raise RunFailedError("lmms-eval returned no results (see its log above)")
    output_path = used_output or output_path
    if not output_path:
        raise RunFailedError("lmms-eval saved no results: give --output_path")
    results_file = _find_results_file(output_path, started)
    if results_file is None:
        raise RunFailedError(f"lmms-eval wrote no results file under {output_path}")
    if not run.tasks():
        print(f"lmms-emi: no task of this run has the EMI metric; results in {results_file}", file=sys.stderr)
        return EXIT_OK
    report_dir = Path(opts.report_dir) if opts.report_dir else results_file.parent
    metadata = {"model": model_name(peek.model, peek.model_args), "model_args": peek.model_args}
    try:
        analysis = run.finalize(metadata)
        reports = write_run_reports(analysis, report_dir)
    except Exception as exc:
        raise RunFailedError(describe_error(exc)) from None
    final = rewrite_results_file(
        results_file,
        analysis,
        reports=reports,
        extra={
            "options": opts.__dict__,
            "added_tasks": plan.added if plan else [],
            "results_file": str(results_file),
        },
    )
    print(_summary(final))
    print(f"lmms-emi: results {results_file}; reports in {report_dir}")
    for message in analysis.warnings:
        print(f"lmms-emi: warning: {message}", file=sys.stderr)
    return EXIT_OK
