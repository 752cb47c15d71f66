"""The task plan of a run inside lmms-eval: which of ``--tasks`` are the plugin's, which are the user's own
(``--metrics emi``), and the ID task added when a shifted task's benchmark lacks it."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lmms_emi import scenarios as sc
from lmms_emi.errors import UsageError
from lmms_emi.harness import make_tasks
from lmms_emi.sources.datasets import LocalDataset

__all__ = ["TaskSelection", "check_local_splits", "select_tasks", "task_path"]


@dataclass
class TaskSelection:
    tasks: list[str]  # what goes to lmms-eval's --tasks
    benchmarks: set[str] = field(default_factory=set)
    foreign: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    leaves: list[str] = field(default_factory=list)  # the plugin tasks the run evaluates (groups expanded)
    folder: Path | None = None  # the run's task folder (``--metrics emi`` on other tasks)


_YAML = (".yaml", ".yml")


def task_path(tasks_arg: str) -> Path | None:
    """The task YAML file or folder of task YAMLs that ``--tasks`` names, when it names one; None when it
    holds task names.

    An entry that is a path (a separator, a leading ``.`` or ``~``, or an existing file: lmms-eval parses
    any existing file named in ``--tasks`` as a task config) must be an existing ``.yaml`` file or a folder
    holding task YAMLs, given alone; anything else is a UsageError before lmms-eval reads it."""
    entries = [e.strip() for e in tasks_arg.split(",") if e.strip()]
    paths = [e for e in entries if _is_path(e)]
    if not paths:
        return None
    value = paths[0]
    path = Path(value).expanduser()
    if len(entries) == 1 and path.is_file() and path.suffix.lower() in _YAML:
        return path
    if len(entries) == 1 and path.is_dir() and any(p.suffix.lower() in _YAML for p in path.rglob("*")):
        return path
    if len(entries) > 1:
        what = "a task YAML path goes alone, not among task names"
    elif path.is_dir():
        what = "a folder without task YAMLs"
    elif path.exists():
        what = "not a task .yaml file"
    else:
        what = "no such task YAML file or folder"
    raise UsageError(
        f"--tasks {value}: {what}; give task names (`lmms-emi eval --tasks list`), a task .yaml file or a "
        "folder of task YAMLs"
    )


def _is_path(entry: str) -> bool:
    return "/" in entry or "\\" in entry or entry.startswith((".", "~")) or Path(entry).is_file()


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


def select_tasks(tasks_arg: str) -> TaskSelection:
    """Resolve ``--tasks``: the plugin's names (wildcards too), unknown plugin-looking names (error), other
    lmms-eval tasks (foreign); add each touched benchmark's ID task when the run lacks it."""
    ours = make_tasks.plugin_names()
    requested = [t.strip() for t in tasks_arg.split(",") if t.strip()]
    plan = TaskSelection(tasks=[])
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


def check_local_splits(plan: TaskSelection, data: Mapping[str, LocalDataset]) -> None:
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
