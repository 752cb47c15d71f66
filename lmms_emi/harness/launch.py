"""An EMI run inside lmms-eval, for its two callers: ``lmms-emi eval`` (:func:`run_eval`) and plain
``lmms-eval`` (:mod:`lmms_emi.harness.hook`). Both go through the same three steps:

1. :func:`prepare_run` plans the run: the one preflight (:mod:`lmms_emi.pipeline.preflight`: outputs,
   estimator, judge, encoders) before any generation; resolves ``--tasks`` (:mod:`.selection`: a run of
   shifted tasks gets its benchmark's ID task added, EMID needs it; ``--metrics emi`` attaches the EMI
   metric to other lmms-eval tasks through a run task folder); picks the task folder (the plugin's, or with
   ``--data`` a copy whose ``_dataset.yaml`` points at the local copy); exports the run's config for the
   run session of every process;
2. :func:`activate` installs two class-level patches of lmms-eval (:mod:`.patches`, idempotent, inert
   without an active run): every ``TaskManager`` gets the task folder appended to its ``include_path``
   (built-in and ``--include_path`` task names win), and the run's TaskManager registers the
   ``--metrics emi`` tasks;
3. right after lmms-eval's ``EvaluationTracker.save_results_aggregated`` wrote this run's results JSON
   (rank 0), :meth:`EvalRun.finish`: :meth:`RunSession.finalize` (the one pipeline),
   :func:`lmms_emi.report.write_run_reports` next to the results JSON, and the final numbers merged into
   that JSON (atomic rewrite) and into the results dict lmms-eval prints as its tables.

The launcher runs ``cli_evaluate`` in its own process, recording the exception or results of
``cli_evaluate_single`` (lmms-eval logs errors and returns normally, so a failed run would otherwise look
successful), and turns errors into one line and an exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from lmms_emi import lmms_eval_compat as compat
from lmms_emi import scenarios as sc
from lmms_emi._io import os_error_of, scratch_dir
from lmms_emi.config import EMIConfig
from lmms_emi.errors import EXIT_OK, LmmsEmiError, RunFailedError, UsageError, one_line
from lmms_emi.harness import argv, foreign, overrides, session
from lmms_emi.harness.describe import describe_error, user_error
from lmms_emi.harness.make_tasks import LIST_COMMANDS
from lmms_emi.harness.patches import RESULTS_SUFFIX, activate, active, install_patches
from lmms_emi.harness.replay import REPLAY_MODEL, model_manifests
from lmms_emi.harness.results import rewrite_results_file, update_results
from lmms_emi.harness.selection import TaskSelection, check_local_splits, select_tasks, task_path
from lmms_emi.paths import tasks_dir, user_cache_dir
from lmms_emi.pipeline.preflight import check_free_space, check_outputs, preflight
from lmms_emi.pipeline.run import plan_run
from lmms_emi.report import write_run_reports
from lmms_emi.sources.run_folder import model_name
from lmms_emi.tables import fmt_number

__all__ = [
    "DEFAULT_OUTPUT",
    "LIST_COMMANDS",
    "EvalRun",
    "TaskSelection",
    "activate",
    "active",
    "describe_error",
    "install_patches",
    "prepare_run",
    "run_eval",
    "select_tasks",
]

DEFAULT_OUTPUT = "emi_results"
SCRATCH_PREFIX = "lmms_emi_run_"  # private task-folder copies of a run, under the system temp dir


# ------------------------------------------------------------------------------------------- the run
@dataclass
class EvalRun:
    """One planned EMI run inside lmms-eval, shared by its two callers (``lmms-emi eval`` and plain
    ``lmms-eval`` through :mod:`lmms_emi.harness.hook`): what the patches of :func:`install_patches` add to
    lmms-eval, and what :meth:`finish` produced (read by the launcher)."""

    config: EMIConfig
    lmms_args: list[str]  # lmms-eval's arguments after planning (tasks, output path)
    include_paths: list[str]  # the plugin's task folder (or its --data copy): appended to every TaskManager
    plan: TaskSelection | None
    raise_errors: bool = True  # the launcher reports errors itself; plain lmms-eval: one line, then exit
    model: str | None = None
    model_args: str | None = None
    registered: bool = False  # foreign tasks registered on the run's TaskManager
    results_file: Path | None = None  # the results JSON lmms-eval's tracker wrote for this run
    final: dict | None = None  # the results dict after the merge
    error: BaseException | None = None

    def task_manager_built(self, manager: Any) -> None:
        """On the run's own TaskManager (once): every task the run names must be indexed (one line naming
        the unknown ones, before lmms-eval loads anything), then the ``--metrics emi`` tasks registered."""
        if self.registered or self.plan is None:
            return
        self.registered = True
        unknown = compat.unknown_tasks(manager, self.plan.tasks)
        if unknown:
            self.fail(UsageError(f"unknown task(s): {', '.join(unknown)}; see `lmms-emi eval --tasks list`"))
        if not self.plan.foreign or self.plan.folder is None:
            return
        run = session.current()
        run.on_stop(self.fail)
        try:
            for name in self.plan.foreign:
                foreign.register(run, manager, name)
        except LmmsEmiError as exc:
            self.fail(exc)

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
        opts = self.config
        report_dir = Path(
            opts.report_dir or (results_file.parent if results_file is not None else DEFAULT_OUTPUT)
        )
        metadata = {"model": model_name(self.model, self.model_args), "model_args": self.model_args}
        processes = process_info(run)
        extra = {
            "options": opts.to_dict(),
            "added_tasks": self.plan.added if self.plan else [],
            "results_file": None if results_file is None else str(results_file),
            **processes,
        }
        resume = ""
        if results_file is not None:
            try:  # the responses on disk before any EMI computation: a failing EMI step loses no generation
                write_sample_logs(run, results_file)
                resume = f"; the responses are saved: finish with `lmms-emi analyze {results_file.parent}`"
            except OSError as exc:
                self.fail(_without_emi(exc, results_file))
        for message in process_warnings(processes):
            print(f"lmms-emi: warning: {message}", file=sys.stderr)
        try:
            analysis = run.finalize(metadata, shift_kinds=sc.shift_kinds_of(results.get("configs") or {}))
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
            self.fail(_without_emi(exc, results_file, resume))
        self.final = final
        print(_summary(final))
        print(f"lmms-emi: {processes_line(processes)}")
        print(f"lmms-emi: results {results_file}; reports in {report_dir}")
        for message in analysis.warnings:
            print(f"lmms-emi: warning: {message}", file=sys.stderr)

    def fail(self, exc: LmmsEmiError) -> NoReturn:
        """Stop the run here (``SystemExit``: lmms-eval catches only ``Exception``, so nothing more runs);
        plain lmms-eval gets one line, the launcher raises ``exc`` itself (:func:`run_eval`)."""
        self.error = exc
        if not self.raise_errors:
            print(f"lmms-emi: error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(exc.exit_code)


INCOMPLETE_SUFFIX = "_results.incomplete.json"


def write_sample_logs(run: session.RunSession, results_file: Path) -> list[Path]:
    """``<id>_samples_<task>.jsonl`` beside ``results_file`` (lmms-eval's sample-log format, what
    ``lmms-emi analyze`` reads) for every EMI task of the run whose log lmms-eval did not write (no
    ``--log_samples``); return the files written. Each line: ``doc_id``, ``target``, ``filtered_resps`` and
    the EMI record under ``emi``, as a ``--log_samples`` line."""
    from lmms_emi._io import atomic_write_text
    from lmms_emi.metrics import RECORD_METRIC

    run_id = results_file.name[: -len(RESULTS_SUFFIX)] if results_file.name.endswith(RESULTS_SUFFIX) else None
    if run_id is None:
        return []
    written = []
    for task in run.tasks():
        path = results_file.with_name(f"{run_id}_samples_{task}.jsonl")
        if path.exists():
            continue
        lines = [
            json.dumps(
                {
                    "doc_id": r.get("doc_id"),
                    "target": "" if r.get("reference") is None else str(r["reference"]),
                    "filtered_resps": [r.get("response", "")],
                    RECORD_METRIC: r,
                },
                ensure_ascii=False,
                default=str,
            )
            for r in run.records(task)
        ]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        written.append(path)
    return written


def _world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size())
    except Exception:  # no usable torch.distributed: one process
        pass
    return 1


def requested_processes(
    environ: Mapping[str, str] | None = None, parent_cmdline: list[str] | None = None
) -> tuple[int, str] | None:
    """(N, what asked for it) when the launcher's environment asked for N processes: ``WORLD_SIZE``, else
    ``--num_processes`` / ``--nproc_per_node`` of the parent command (``accelerate launch``, ``torchrun``;
    ``accelerate launch --cpu`` starts one process whatever it is told); None when nothing says."""
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE", "").strip().isdigit():
        return int(env["WORLD_SIZE"]), "WORLD_SIZE"
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            parent_cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        except OSError:
            parent_cmdline = []
    for i, arg in enumerate(parent_cmdline):
        for flag in ("--num_processes", "--nproc_per_node", "--nproc-per-node", "--num-processes"):
            value = None
            if arg == flag and i + 1 < len(parent_cmdline):
                value = parent_cmdline[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None and value.strip().isdigit():
                return int(value), f"the launcher's {flag}"
    return None


def process_info(run: session.RunSession) -> dict[str, Any]:
    """The run's process count, what the launcher asked for, and the ranks whose samples reached rank 0."""
    ranks = sorted({int(r["rank"]) for t in run.tasks() for r in run.records(t) if r.get("rank") is not None})
    asked = requested_processes()
    return {
        "world_size": _world_size(),
        "requested_processes": None if asked is None else asked[0],
        "requested_by": None if asked is None else asked[1],
        "sample_ranks": ranks,
    }


def processes_line(info: Mapping[str, Any]) -> str:
    ranks = ", ".join(str(r) for r in info.get("sample_ranks", [])) or "none"
    world = info.get("world_size", 1)
    return f"{world} process{'es' if world != 1 else ''}; samples from rank(s) {ranks}"


def process_warnings(info: Mapping[str, Any]) -> list[str]:
    asked, world = info.get("requested_processes"), info.get("world_size", 1)
    if asked is not None and asked > world:
        return [
            f"{asked} processes were asked for ({info.get('requested_by')}) but {world} ran "
            "(`accelerate launch --cpu` starts one process; use torchrun on CPU)"
        ]
    return []


def _without_emi(exc: Exception, results_file: Path | None, resume: str = "") -> LmmsEmiError:
    """The error of a failed EMI step. When the step could not publish its numbers (a write failed: a full
    disk), lmms-eval's results JSON (its EMI values still null) is first moved to
    ``<id>_results.incomplete.json``: no ``*_results.json`` is left half-published (the moved file keeps
    lmms-eval's other scores). A step refused on its data (too few samples, ...) leaves it as it is."""
    message = one_line(exc) if isinstance(exc, LmmsEmiError) else describe_error(exc)
    publish_failed = os_error_of(exc) is not None or isinstance(user_error(exc), OSError)
    if (
        publish_failed
        and results_file is not None
        and results_file.name.endswith(RESULTS_SUFFIX)
        and results_file.is_file()
    ):
        aside = results_file.with_name(results_file.name[: -len(RESULTS_SUFFIX)] + INCOMPLETE_SUFFIX)
        try:
            os.replace(results_file, aside)  # a rename: needs no free space
            message += f"; lmms-eval's results without the EMI numbers were moved to {aside}"
        except OSError:
            pass
    error = RunFailedError(message + resume)
    error.exit_code = exc.exit_code if isinstance(exc, LmmsEmiError) else RunFailedError.exit_code
    return error


def _merge_metric_values(results: dict[str, Any], final: Mapping[str, Any]) -> None:
    """Copy the final ``<metric>,<filter>`` values of ``final`` into lmms-eval's in-memory ``results`` (what
    it prints as its tables next); the rest (``emid_by_task``, ``lmms_emi``, ...) is in the file only."""
    for section in ("results", "groups"):
        for name, entry in final.get(section, {}).items():
            if name in results.get(section, {}):
                results[section][name].update({k: v for k, v in entry.items() if "," in k})


def prepare_run(
    config: EMIConfig,
    lmms_args: list[str],
    run_dir: Path,
    metrics: str | None,
    *,
    raise_errors: bool = True,
) -> EvalRun:
    """Plan a run for either caller: the one preflight (outputs, estimator, encoders, judge: before any
    generation, on rank 0), ``--tasks`` resolved (ID task added, ``--metrics emi`` tasks), the task folder
    (a ``--data`` copy in ``run_dir``), the default output path; the config exported for every process of
    the run (:data:`lmms_emi.harness.session.RUN_CONFIG_VAR`)."""
    peek = argv.peek(lmms_args)
    rank = int(os.environ.get("RANK", "0"))
    if not peek.tasks and not peek.config:
        raise UsageError("give the tasks to run with --tasks (e.g. --tasks llavabench_shift_synthetic)")
    if metrics and metrics.strip().lower() != "emi":
        raise UsageError(f"--metrics {metrics}: only 'emi' is supported")
    names_tasks = bool(peek.tasks) and peek.tasks not in LIST_COMMANDS and task_path(peek.tasks) is None
    output_path = peek.output_path or (DEFAULT_OUTPUT if names_tasks else None)
    outputs = {"--output_path": output_path, "--report-dir": config.report_dir}
    if rank == 0:  # every output before any input is read
        check_outputs(outputs)
    data = overrides.parse_data_args(list(config.data))
    plan = None
    notes: list[str] = []  # said once the preflight passed
    if names_tasks:
        plan = select_tasks(peek.tasks)
        check_local_splits(plan, data)
        native = foreign.native_emi_tasks(peek.include_path if metrics else None, plan.foreign)
        for group, tasks in native.groups.items():  # a group of the user's EMI tasks: scored as its tasks
            plan.tasks = _replaced(plan.tasks, group, tasks)
            plan.foreign = _replaced(plan.foreign, group, tasks)
        if config.id_task is None and len(native.id_tasks) == 1:  # the ID task the family's YAMLs name
            config = dataclasses.replace(config, id_task=next(iter(native.id_tasks)))
        if config.id_task is not None:
            plan_run([config.id_task], config.id_task)  # a plugin task cannot be the explicit ID task
            if not metrics:
                raise UsageError(
                    f"ID task {config.id_task}: an explicit ID task is for your own tasks scored with "
                    "--metrics emi; add --metrics emi"
                )
            if config.id_task not in plan.tasks:
                plan.tasks.append(config.id_task)
                plan.foreign.append(config.id_task)
                plan.added.append(config.id_task)
        if metrics and len(plan.foreign) + len(native.leaves) > 1 and config.id_task is None:
            notes.append(
                "EMI only for your own tasks; for EMID and the bounds name their ID task with "
                "--emi-id-task (plain lmms-eval: LMMS_EMI_ID_TASK)"
            )
        if plan.added:
            notes.append(f"adding the ID task {', '.join(plan.added)} (EMID is measured against it)")
        if not peek.output_path:
            lmms_args = argv.set_arg(lmms_args, "--output_path", DEFAULT_OUTPUT)
            notes.append(f"writing results under ./{DEFAULT_OUTPUT} (set --output_path to change)")
        if rank == 0:
            check_free_space(_space_needs(config, outputs, plan))
    ready = None
    if rank == 0 and plan is not None:
        # the one preflight: outputs, estimator, judge, the encoders' configs (no weights), the estimator
        # against them; a registered estimator (named, or the default of these encoders) is downloaded now
        try:
            ready = preflight(config, outputs=outputs, token_logprobs=False)
        except LmmsEmiError:
            raise
        except ValueError as exc:  # a checkpoint / encoder mismatch, a download refused
            raise UsageError(f"--estimator {config.estimator}: {exc}") from None
        except Exception as exc:  # e.g. an encoder that cannot be loaded
            raise UsageError(describe_error(exc)) from None
    if rank == 0:
        for note in notes:
            print(f"lmms-emi: {note}", file=sys.stderr)
    include_paths = [str(overrides.build_include_dir(run_dir, data, tasks_dir()) if data else tasks_dir())]
    if plan is not None:
        if plan.foreign and metrics:
            plan.folder = foreign.write_task_folder(plan, run_dir)
            lmms_args = argv.set_arg(lmms_args, "--tasks", str(plan.folder))
        else:
            lmms_args = argv.set_arg(lmms_args, "--tasks", ",".join(plan.tasks))
    session.export(config)
    session.reset(config, ready)
    return EvalRun(
        config=config,
        lmms_args=lmms_args,
        include_paths=include_paths,
        plan=plan,
        raise_errors=raise_errors,
        model=peek.model,
        model_args=peek.model_args,
    )


def _replaced(names: list[str], name: str, by: list[str]) -> list[str]:
    """``names`` with ``name`` replaced by ``by`` (names already present not repeated)."""
    out: list[str] = []
    for n in names:
        out.extend(t for t in (by if n == name else [n]) if t not in out)
    return out


# Rough sizes of what a run writes, to refuse a disk that clearly cannot hold it before any generation: the
# benchmark's splits have at most 90 rows; per sample a --log_samples line (~4 KiB), four 768-dim float32
# vectors in the embeddings file (12 KiB) and four embedding-cache entries (a 4 KiB block each); per run a
# fitted estimator (3 MiB), the figures and the results JSON.
ROWS_PER_TASK = 90
OUTPUT_BYTES_PER_SAMPLE = 16 * 2**10
CACHE_BYTES_PER_SAMPLE = 16 * 2**10
OUTPUT_BYTES_PER_RUN = 8 * 2**20


def _space_needs(
    config: EMIConfig, outputs: Mapping[str, str | None], plan: TaskSelection
) -> dict[str, tuple[str | Path | None, int]]:
    """What the run writes where (see the constants above): responses and reports in the output folder (the
    reports in ``--report-dir`` when given), embeddings in the cache."""
    samples = ROWS_PER_TASK * (len(plan.leaves) + len(plan.foreign))
    outputs_bytes = OUTPUT_BYTES_PER_RUN + OUTPUT_BYTES_PER_SAMPLE * samples
    needs: dict[str, tuple[str | Path | None, int]] = {
        "--output_path": (outputs.get("--output_path"), outputs_bytes)
    }
    if outputs.get("--report-dir"):
        needs["--report-dir"] = (outputs["--report-dir"], outputs_bytes)
    cache = config.cache_folder
    if cache is not False:
        folder = user_cache_dir("embeddings") if cache in (None, True) else cache
        needs["--emi-cache"] = (folder, CACHE_BYTES_PER_SAMPLE * samples)
    return needs


# ------------------------------------------------------------------------------------------- lmms-eval
def _call_lmms_eval(lmms_args: list[str]) -> tuple[dict | None, BaseException | None]:
    """Run lmms-eval's CLI here on ``lmms_args``; (results on rank 0, exception)."""
    captured: dict[str, Any] = {}

    def recording(evaluate: Any, args: argparse.Namespace) -> Any:
        try:
            out = evaluate(args)
        except Exception as exc:
            captured["error"] = exc
            if user_error(exc) is not None:
                # a problem the user can fix, said in one line by run_eval: past lmms-eval's handler, which
                # would print its traceback first
                raise _Stop from None
            raise
        captured["results"] = out[0] if isinstance(out, tuple) else out
        return out

    try:
        compat.call_cli(lmms_args, recording)
    except _Stop:
        pass
    return captured.get("results"), captured.get("error")


class _Stop(BaseException):
    """Ends lmms-eval's ``cli_evaluate`` past its ``except Exception`` (the error is in ``captured``)."""


def _register_replay_model() -> None:
    """Make ``emi_replay`` resolvable in this process also when the plugin is not installed (a checkout):
    installed, lmms-eval finds it through the ``lmms_eval.models`` entry point."""
    if REPLAY_MODEL not in compat.registered_model_names():
        compat.register_model_manifests(model_manifests())


def _summary(results: dict[str, Any]) -> str:
    """A short plain-text table of the EMI numbers."""

    def f(v: Any) -> str:
        return fmt_number(v, 4, missing="-")

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
def run_eval(config: EMIConfig, lmms_args: list[str], *, metrics: str | None) -> int:
    """Run lmms-eval with ``lmms_args`` and the EMI ``config``; return the exit status (raises
    :class:`~lmms_emi.errors.LmmsEmiError` for a problem the user can fix)."""
    refused = compat.version_gate("`lmms-emi eval` needs the patches it was tested with")
    if refused is not None:
        raise UsageError(refused)
    run_dir = scratch_dir(SCRATCH_PREFIX)  # a killed run's folder is removed by the next run
    try:
        with session.exported(config):
            prep = prepare_run(config, list(lmms_args), run_dir, metrics)
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
        fixable = user_error(error)
        raise fixable if isinstance(fixable, LmmsEmiError) else RunFailedError(describe_error(error))
    if rank != 0 or prep.plan is None:
        return EXIT_OK  # other ranks, --tasks list, a --config run
    if results is None:
        raise RunFailedError("lmms-eval returned no results (see its log above)")
    if prep.results_file is None:
        raise RunFailedError("lmms-eval wrote no results file (see its log above)")
    return EXIT_OK
