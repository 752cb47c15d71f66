"""``--metrics emi``: score other lmms-eval generation tasks (e.g. ``llava_in_the_wild``) with EMI, no judge.

Each such task gets a one-task YAML ``{task: <name>, process_docs}`` in a run folder; lmms-eval merges a
config naming a registered task over that task's own config, so the task keeps its name, prompt, data,
generation settings and its own metrics. The EMI metrics are added beside the task's own ones by the patches
of :mod:`lmms_emi.harness.patches` (its ``process_results`` result plus the EMI records; its aggregations
plus the EMI ones), whether its metrics come from its own ``process_results`` or lmms-eval's built-in ones.
All tasks of the run go to lmms-eval as that folder (``--tasks DIR``: every YAML in it is one task or group
config). Once the run's own ``TaskManager`` is built, each foreign task's ``doc_to_visual`` /
``doc_to_text`` / ``doc_to_target`` / ``process_docs`` are read from its config and registered with the run
session (:func:`register`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_emi import lmms_eval_compat as compat
from lmms_emi import scenarios as sc
from lmms_emi.errors import UsageError
from lmms_emi.harness import overrides
from lmms_emi.harness.session import ForeignTask, RunSession


class ForeignTaskError(UsageError):
    """A task that ``--metrics emi`` cannot score."""


def _field(
    value: Any, what: str, task: str, kwargs: Mapping[str, Any] | None = None
) -> Callable[[dict], Any]:
    """A doc -> value accessor for a task config field (callable, column name or Jinja template)."""
    if callable(value):
        if kwargs is not None and _takes_two(value):
            return lambda doc: value(doc, dict(kwargs))
        return lambda doc: value(doc)
    if isinstance(value, str):
        return lambda doc: doc[value] if value in doc else compat.render_template(value, doc)
    raise ForeignTaskError(f"--metrics emi: task {task} has no usable {what}")


def _takes_two(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a second positional argument (``lmms_eval_specific_kwargs``): user tasks often
    define ``doc_to_text(doc)`` with one argument, as lmms-eval calls them then."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _specific_kwargs(config: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = config.get("lmms_eval_specific_kwargs")
    if not isinstance(raw, Mapping):
        return None
    return dict(raw.get("default", raw))


def register(run: RunSession, task_manager: Any, name: str) -> None:
    """Register task ``name``'s accessors with the run session (raises ForeignTaskError when not scorable)."""
    if name not in task_manager.all_tasks:
        raise ForeignTaskError(f"unknown task {name!r}; see `lmms-emi eval --tasks list`")
    if compat.task_kind(task_manager, name) != "task":
        raise ForeignTaskError(f"--metrics emi: {name} is a group or tag; list its tasks instead")
    config = compat.task_config(task_manager, name)
    if config.get("output_type", "generate_until") != "generate_until":
        raise ForeignTaskError(f"--metrics emi: task {name} is not a generation task")
    lacks = [
        what
        for what, key in (
            ("an image (doc_to_visual)", "doc_to_visual"),
            ("a question (doc_to_text)", "doc_to_text"),
            ("a reference answer (doc_to_target)", "doc_to_target"),
        )
        if config.get(key) is None or config.get(key) == ""
    ]
    if lacks:
        raise ForeignTaskError(f"--metrics emi: task {name} cannot give EMI {' or '.join(lacks)}")
    kwargs = _specific_kwargs(config)
    run.register_foreign(
        ForeignTask(
            name=name,
            doc_to_visual=_field(config["doc_to_visual"], "doc_to_visual", name),
            doc_to_text=_field(
                config.get("doc_to_text"), "doc_to_text", name, kwargs if kwargs is not None else {}
            ),
            doc_to_target=_field(config["doc_to_target"], "doc_to_target", name),
            process_docs=config.get("process_docs"),
        )
    )


@dataclass
class NativeTasks:
    """Which ``--metrics emi`` names are the user's EMI tasks or groups of them (task YAMLs calling the
    plugin's ``process_results``, as ``lmms-emi make-shifts`` writes them), and the ID task their YAML
    ``metadata`` names (:data:`lmms_emi.scenarios.ID_TASK_KEY`; the shift kinds are read back from the
    results' configs). A group is scored as its tasks (``groups``: the group's tasks, in its order)."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    leaves: set[str] = field(default_factory=set)  # every task of the native names
    id_tasks: set[str] = field(default_factory=set)


def native_emi_tasks(include_path: str | None, names: Iterable[str]) -> NativeTasks:
    """Classify ``names`` against the user's ``--include_path`` folder(s) (comma-separated) alone: a task is
    native when its ``process_results`` is the plugin's, a group when all of its tasks are."""
    from lmms_emi.harness import task_utils

    found = NativeTasks()
    paths = [p for p in (include_path or "").split(",") if p.strip()]
    if not paths:
        return found
    manager = compat.task_manager_class()(include_defaults=False, include_path=paths)

    def leaves(name: str, seen: frozenset[str] = frozenset()) -> list[str] | None:
        kind = compat.task_kind(manager, name)
        if kind is None or name in seen:
            return None
        config = compat.task_config(manager, name)
        if kind == "task":
            if config.get("process_results") is not task_utils.process_results:
                return None
            meta = config.get("metadata") or {}
            if meta.get(sc.ID_TASK_KEY):
                found.id_tasks.add(str(meta[sc.ID_TASK_KEY]))
            return [name]
        members = config.get("task")
        if kind != "group" or not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            return None
        out: list[str] = []
        for member in members:
            got = leaves(member, seen | {name})
            if got is None:
                return None
            out.extend(got)
        return out

    for name in names:
        tasks = leaves(name)
        if tasks:
            found.leaves.update(tasks)
            if compat.task_kind(manager, name) == "group":
                found.groups[name] = list(dict.fromkeys(tasks))
    return found


def write_task_folder(plan: Any, run_dir: Path) -> Path:
    """Write the run's task folder (one YAML per task of ``plan.tasks``, the foreign ones with the EMI
    metric); return it (for ``--tasks``). The foreign tasks' accessors are registered later, with
    :func:`register`, on the run's own TaskManager (no second task index)."""
    folder = run_dir / "emi_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(plan.tasks):
        text = overrides.foreign_task_yaml(name) if name in plan.foreign else f"task: {name}\n"
        (folder / f"{i:03d}_{name.replace('*', '_')}.yaml").write_text(text, encoding="utf-8")
    return folder
