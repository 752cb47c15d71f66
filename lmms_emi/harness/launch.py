"""An EMI run inside lmms-eval, for its two callers: ``lmms-emi eval`` (:func:`run_eval`) and plain
``lmms-eval`` (:mod:`lmms_emi.harness.hook`). Both go through the same three steps:

1. :func:`prepare_run` plans the run: checks the EMI options, a named estimator and the encoders before any
   generation; resolves ``--tasks`` (a run of shifted tasks gets its benchmark's ID task added, EMID needs
   it; ``--metrics emi`` attaches the EMI metric to other lmms-eval tasks through a run task folder); picks
   the task folder (the plugin's, or with ``--data`` a copy whose ``_dataset.yaml`` points at the local
   copy); exports the EMI options (``$LMMS_EMI_OPTIONS``) for the run session of every process;
2. :func:`activate` installs two class-level patches of lmms-eval (:func:`install_patches`, idempotent,
   inert without an active run): every ``TaskManager`` gets the task folder appended to its
   ``include_path`` (built-in and ``--include_path`` task names win), and the run's TaskManager registers the
   ``--metrics emi`` tasks;
3. right after lmms-eval's ``EvaluationTracker.save_results_aggregated`` wrote this run's results JSON
   (rank 0), :meth:`PreparedRun.finish`: :meth:`RunSession.finalize` (the one pipeline),
   :func:`lmms_emi.report.write_run_reports` next to the results JSON, and the final numbers merged into
   that JSON (atomic rewrite) and into the results dict lmms-eval prints as its tables.

The launcher runs ``cli_evaluate`` in its own process, recording the exception or results of
``cli_evaluate_single`` (lmms-eval logs errors and returns normally, so a failed run would otherwise look
successful), and turns errors into one line and an exit status.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import functools
import inspect
import os
import shutil
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from lmms_emi import scenarios as sc
from lmms_emi._io import ensure_writable_dir, reserve_file, scratch_dir
from lmms_emi.errors import EXIT_OK, LmmsEmiError, RunFailedError, UsageError, one_line
from lmms_emi.harness import foreign, make_tasks, overrides, session
from lmms_emi.harness.make_tasks import LIST_COMMANDS
from lmms_emi.harness.options import EMIOptions
from lmms_emi.harness.replay import REPLAY_MODEL, model_manifests
from lmms_emi.harness.results import rewrite_results_file, update_results
from lmms_emi.judge import Judge
from lmms_emi.paths import tasks_dir
from lmms_emi.pipeline.run import plan_run
from lmms_emi.report import write_run_reports
from lmms_emi.sources.datasets import LocalDataset
from lmms_emi.sources.run_folder import model_name

__all__ = [
    "DEFAULT_OUTPUT",
    "LIST_COMMANDS",
    "PreparedRun",
    "TaskPlan",
    "activate",
    "active",
    "describe_error",
    "install_patches",
    "plan_tasks",
    "prepare_run",
    "run_eval",
]

DEFAULT_OUTPUT = "emi_results"
SCRATCH_PREFIX = "lmms_emi_run_"  # private task-folder copies of a run, under the system temp dir


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
@dataclass
class TaskPlan:
    tasks: list[str]  # what goes to lmms-eval's --tasks
    benchmarks: set[str] = field(default_factory=set)
    foreign: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    leaves: list[str] = field(default_factory=list)  # the plugin tasks the run evaluates (groups expanded)
    folder: Path | None = None  # the run's task folder (``--metrics emi`` on other tasks)


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
    ours = make_tasks.plugin_names()
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
            if make_tasks.looks_like_plugin_name(name):
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


# ------------------------------------------------------------------------------------------- the run
@dataclass
class PreparedRun:
    """One planned EMI run inside lmms-eval, shared by its two callers (``lmms-emi eval`` and plain
    ``lmms-eval`` through :mod:`lmms_emi.harness.hook`): what the patches of :func:`install_patches` add to
    lmms-eval, and what :meth:`finish` produced (read by the launcher)."""

    options: EMIOptions
    lmms_args: list[str]  # lmms-eval's arguments after planning (tasks, output path)
    include_paths: list[str]  # the plugin's task folder (or its --data copy): appended to every TaskManager
    plan: TaskPlan | None
    builtin_tasks: bool = True
    raise_errors: bool = True  # the launcher reports errors itself; plain lmms-eval: one line, then exit
    model: str | None = None
    model_args: str | None = None
    registered: bool = False  # foreign tasks registered on the run's TaskManager
    results_file: Path | None = None  # the results JSON lmms-eval's tracker wrote for this run
    final: dict | None = None  # the results dict after the merge
    error: BaseException | None = None

    def task_manager_built(self, manager: Any) -> None:
        """Register the ``--metrics emi`` tasks on the run's own TaskManager (once)."""
        if self.registered or self.plan is None or not self.plan.foreign or self.plan.folder is None:
            return
        self.registered = True
        run = session.current()
        try:
            for name in self.plan.foreign:
                foreign.register(run, manager, name)
        except LmmsEmiError as exc:
            self._fail(exc)

    def finish(self, results: dict[str, Any], results_file: Path | None) -> None:
        """After lmms-eval's evaluation (rank 0, results already saved): the run's records through the one
        pipeline, the reports, and the final numbers merged into ``results`` (what lmms-eval prints next) and
        into ``results_file`` (atomic rewrite)."""
        self.results_file = results_file
        run = session.current()
        if not run.tasks():
            if self.plan is not None:
                where = results_file or "(not saved: no --output_path)"
                print(
                    f"lmms-emi: no task of this run has the EMI metric; results in {where}", file=sys.stderr
                )
            return
        opts = self.options
        report_dir = Path(
            opts.report_dir or (results_file.parent if results_file is not None else DEFAULT_OUTPUT)
        )
        metadata = {"model": model_name(self.model, self.model_args), "model_args": self.model_args}
        extra = {
            "options": opts.__dict__,
            "added_tasks": self.plan.added if self.plan else [],
            "results_file": None if results_file is None else str(results_file),
        }
        try:
            analysis = run.finalize(metadata)
            run_id = (
                results_file.name[: -len(RESULTS_SUFFIX)]
                if results_file is not None and report_dir == results_file.parent
                else None
            )  # the reports carry the id of the results file they sit beside
            reports = write_run_reports(analysis, report_dir, run_id=run_id)
            if results_file is None:
                final = update_results(results, analysis, extra=extra, reports=reports)
            else:
                final = rewrite_results_file(results_file, analysis, extra=extra, reports=reports)
                _merge_metric_values(results, final)
        except Exception as exc:
            self._fail(exc if isinstance(exc, LmmsEmiError) else RunFailedError(describe_error(exc)))
        self.final = final
        print(_summary(final))
        print(f"lmms-emi: results {results_file}; reports in {report_dir}")
        for message in analysis.warnings:
            print(f"lmms-emi: warning: {message}", file=sys.stderr)

    def _fail(self, exc: LmmsEmiError) -> NoReturn:
        """Stop the run here (``SystemExit``: lmms-eval catches only ``Exception``, so nothing more runs);
        plain lmms-eval gets one line, the launcher raises ``exc`` itself (:func:`run_eval`)."""
        self.error = exc
        if not self.raise_errors:
            print(f"lmms-emi: error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(exc.exit_code)


def _merge_metric_values(results: dict[str, Any], final: Mapping[str, Any]) -> None:
    """Copy the final ``<metric>,<filter>`` values of ``final`` into lmms-eval's in-memory ``results`` (what
    it prints as its tables next); the rest (``emid_by_task``, ``lmms_emi``, ...) is in the file only."""
    for section in ("results", "groups"):
        for name, entry in final.get(section, {}).items():
            if name in results.get(section, {}):
                results[section][name].update({k: v for k, v in entry.items() if "," in k})


_ACTIVE: PreparedRun | None = None
PATCH_MARK = "__lmms_emi_patch__"


def active() -> PreparedRun | None:
    """The run this process is in, when one was prepared."""
    return _ACTIVE


def activate(prep: PreparedRun | None) -> None:
    """Make ``prep`` this process's run (None: none) and install the patches it needs."""
    global _ACTIVE
    if prep is not None:
        install_patches()
    _ACTIVE = prep


def install_patches() -> None:
    """Wrap, once per process (idempotent), two lmms-eval class attributes; both do nothing without an
    active run: ``TaskManager.__init__`` appends the run's task folder to ``include_path`` (after the
    built-in tasks and the user's ``--include_path``, so their names win) and registers ``--metrics emi``
    tasks; ``EvaluationTracker.save_results_aggregated`` finishes the run (:meth:`PreparedRun.finish`) with
    the very results file it just wrote."""
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.tasks import TaskManager

    _wrap(TaskManager, "__init__", _task_manager_init)
    _wrap(EvaluationTracker, "save_results_aggregated", _save_results_aggregated)


def _wrap(cls: type, name: str, make: Any) -> None:
    original = getattr(cls, name)
    if getattr(original, PATCH_MARK, False):
        return
    wrapper = functools.wraps(original)(make(original, inspect.signature(original)))
    setattr(wrapper, PATCH_MARK, True)
    setattr(cls, name, wrapper)


def _task_manager_init(original: Any, signature: inspect.Signature) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        prep = _ACTIVE
        if prep is None:
            original(self, *args, **kwargs)
            return
        bound = signature.bind(self, *args, **kwargs)
        given = bound.arguments.get("include_path")
        paths = [given] if isinstance(given, str) else list(given or [])
        bound.arguments["include_path"] = paths + [p for p in prep.include_paths if p not in paths]
        if not prep.builtin_tasks:
            bound.arguments["include_defaults"] = False
        original(*bound.args, **bound.kwargs)
        prep.task_manager_built(self)

    return __init__


def _save_results_aggregated(original: Any, signature: inspect.Signature) -> Any:
    def save_results_aggregated(self: Any, *args: Any, **kwargs: Any) -> Any:
        prep = _ACTIVE
        if prep is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        claimed = _claim_results_file(self, bound.arguments.get("datetime_str"))
        if claimed is not None:
            bound.arguments["datetime_str"] = claimed.name[: -len(RESULTS_SUFFIX)]
        try:
            out = original(*bound.args, **bound.kwargs)
        except BaseException:
            if claimed is not None and claimed.stat().st_size == 0:
                claimed.unlink(missing_ok=True)  # our empty claim, never written
            raise
        prep.finish(bound.arguments["results"], _written_results_file(self))
        return out

    return save_results_aggregated


RESULTS_SUFFIX = "_results.json"  # lmms-eval's <date id>_results.json


def _claim_results_file(tracker: Any, datetime_str: str | None) -> Path | None:
    """Claim a results-file name no other run uses (lmms-eval's date id has one-second resolution, so two
    runs sharing an output folder can get the same one): ``<date id>_results.json``, else ``<date id>-2``,
    ... created empty and exclusively; lmms-eval then writes into it, and its sample logs share the id."""
    if not tracker.output_path or not datetime_str:
        return None
    folder = Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized
    base = datetime_str.replace(":", "-")
    for attempt in range(1, 1000):
        path = folder / f"{base if attempt == 1 else f'{base}-{attempt}'}{RESULTS_SUFFIX}"
        if reserve_file(path):
            return path
    return None


def _written_results_file(tracker: Any) -> Path | None:
    """The results JSON ``tracker`` has just written (``<output_path>/<model>/<date id>_results.json``)."""
    date_id = getattr(tracker, "date_id", None)
    if not tracker.output_path or not date_id:
        return None
    folder = Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized
    path = folder / f"{date_id}{RESULTS_SUFFIX}"
    return path if path.is_file() else None


def prepare_run(
    opts: EMIOptions,
    lmms_args: list[str],
    run_dir: Path,
    data_args: list[str],
    metrics: str | None,
    *,
    builtin_tasks: bool = True,
    raise_errors: bool = True,
) -> PreparedRun:
    """Plan a run for either caller: check the EMI options, the estimator and the encoders (before any
    generation), resolve ``--tasks`` (ID task added, ``--metrics emi`` tasks), the task folder (a ``--data``
    copy in ``run_dir``), the default output path; export the options for every process of the run."""
    peek = lmms_peek(lmms_args)
    rank = int(os.environ.get("RANK", "0"))
    if not peek.tasks and not peek.config:
        raise UsageError("give the tasks to run with --tasks (e.g. --tasks llavabench_shift_synthetic)")
    data = overrides.parse_data_args(data_args)
    checkpoint = opts.policy().checkpoint  # builds (validates) the estimator policy
    if checkpoint is not None and not checkpoint.is_file():  # a path, not a registered name
        raise UsageError(f"--estimator {opts.estimator}: no such file")
    opts.settings()  # validates the analysis options before any generation
    if metrics and metrics.strip().lower() != "emi":
        raise UsageError(f"--metrics {metrics}: only 'emi' is supported")
    for option, folder in (("--output_path", peek.output_path), ("--report_dir", opts.report_dir)):
        try:  # an unusable folder fails now, not after the generation
            if folder and rank == 0:
                ensure_writable_dir(folder)
        except OSError as exc:
            raise UsageError(f"{option} {folder}: cannot write there ({exc.strerror or exc})") from None

    include_paths = [str(overrides.build_include_dir(run_dir, data, tasks_dir()) if data else tasks_dir())]
    opts.to_env()
    run = session.reset(opts)
    plan = None
    if peek.tasks and peek.tasks not in LIST_COMMANDS and not os.path.exists(peek.tasks):
        plan = plan_tasks(peek.tasks)
        check_local_splits(plan, data)
        if opts.id_task is not None:
            plan_run([opts.id_task], opts.id_task)  # a plugin task cannot be the explicit ID task
            if not metrics:
                raise UsageError(
                    f"ID task {opts.id_task}: an explicit ID task is for your own tasks scored with "
                    "--metrics emi; add --metrics emi"
                )
            if opts.id_task not in plan.tasks:
                plan.tasks.append(opts.id_task)
                plan.foreign.append(opts.id_task)
                plan.added.append(opts.id_task)
        if metrics and len(plan.foreign) > 1 and opts.id_task is None and rank == 0:
            print(
                "lmms-emi: EMI only for your own tasks; for EMID and the bounds name their ID task with "
                "--emi-id-task (plain lmms-eval: LMMS_EMI_ID_TASK)",
                file=sys.stderr,
            )
        if plan.added and rank == 0:
            print(
                f"lmms-emi: adding the ID task {', '.join(plan.added)} (EMID is measured against it)",
                file=sys.stderr,
            )
        if plan.foreign and metrics:
            plan.folder = foreign.write_task_folder(plan, run_dir)
            lmms_args = set_arg(lmms_args, "--tasks", str(plan.folder))
        else:
            lmms_args = set_arg(lmms_args, "--tasks", ",".join(plan.tasks))
    if plan is not None and not peek.output_path:
        lmms_args = set_arg(lmms_args, "--output_path", DEFAULT_OUTPUT)
        if rank == 0:
            print(
                f"lmms-emi: writing results under ./{DEFAULT_OUTPUT} (set --output_path to change)",
                file=sys.stderr,
            )

    if plan is not None and rank == 0:
        # the encoders' configs are read (no weights): an unreachable encoder fails before generation with
        # the Embedder's one-line EncoderLoadError
        run.encoder_spec()
        judge_config = opts.judge_config()  # --judge: unreachable / misconfigured fails now, as one line
        if judge_config is not None:
            Judge(judge_config).check()
    if opts.estimator != "fit" and plan is not None and rank == 0:
        try:  # fail before the (long) generation when the checkpoint does not fit the encoders; a registered
            run.fixed_estimator()  # estimator (named, or the default of these encoders) is downloaded now
        except ValueError as exc:  # a checkpoint / encoder mismatch, a download refused
            raise UsageError(f"--estimator {opts.estimator or '(default)'}: {exc}") from None
        except Exception as exc:  # e.g. an encoder that cannot be loaded
            raise UsageError(describe_error(exc)) from None
    return PreparedRun(
        options=opts,
        lmms_args=lmms_args,
        include_paths=include_paths,
        plan=plan,
        builtin_tasks=builtin_tasks,
        raise_errors=raise_errors,
        model=peek.model,
        model_args=peek.model_args,
    )


# ------------------------------------------------------------------------------------------- lmms-eval
def _call_lmms_eval(lmms_args: list[str]) -> tuple[dict | None, BaseException | None]:
    """Run ``lmms_eval.__main__.cli_evaluate`` here on ``lmms_args``; (results on rank 0, exception)."""
    import lmms_eval.__main__ as lmms_main

    captured: dict[str, Any] = {}
    original = lmms_main.cli_evaluate_single

    def recording(args: argparse.Namespace) -> Any:
        try:
            out = original(args)
        except Exception as exc:
            captured["error"] = exc
            raise
        captured["results"] = out[0] if isinstance(out, tuple) else out
        return out

    saved_argv = sys.argv
    lmms_main.cli_evaluate_single = recording
    sys.argv = ["lmms-eval", *lmms_args]
    try:
        lmms_main.cli_evaluate()
    finally:
        lmms_main.cli_evaluate_single = original
        sys.argv = saved_argv
    return captured.get("results"), captured.get("error")


def _register_replay_model() -> None:
    """Make ``emi_replay`` resolvable in this process also when the plugin is not installed (a checkout):
    installed, lmms-eval finds it through the ``lmms_eval.models`` entry point."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    if REPLAY_MODEL not in MODEL_REGISTRY_V2.list_model_names():
        for manifest in model_manifests():
            MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


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
    run_dir = scratch_dir(SCRATCH_PREFIX)  # a killed run's folder is removed by the next run
    try:
        prep = prepare_run(
            options, list(lmms_args), run_dir, data_args, metrics, builtin_tasks=builtin_tasks
        )
        activate(prep)  # before lmms-eval is imported: the hook then leaves this run to the launcher
        try:
            _register_replay_model()
            results, error = _call_lmms_eval(prep.lmms_args)
        except SystemExit:
            if prep.error is None:
                raise  # lmms-eval's own exit (--tasks list, ...)
            results, error = None, None
        finally:
            activate(None)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    rank = int(os.environ.get("RANK", "0"))
    if prep.error is not None:
        raise prep.error
    if error is not None:
        raise error if isinstance(error, LmmsEmiError) else RunFailedError(describe_error(error))
    if rank != 0 or prep.plan is None:
        return EXIT_OK  # other ranks, --tasks list, a --config run
    if results is None:
        raise RunFailedError("lmms-eval returned no results (see its log above)")
    if prep.results_file is None:
        raise RunFailedError("lmms-eval wrote no results file (see its log above)")
    return EXIT_OK
