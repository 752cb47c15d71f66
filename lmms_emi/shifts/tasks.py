"""lmms-eval task YAMLs of a shift family: the ID task, every shifted task, the group and its visual / text /
joint subgroups, under ``DIR/tasks`` so that ``--include_path DIR`` finds them.

The YAML format of the plugin's tasks (shared settings, metric list, group aggregation) has one home,
:mod:`lmms_emi.harness.make_tasks`; this layer sits below the harness, so the caller hands those pieces in
as a :class:`TaskYamlKit` (``lmms_emi.cli.make_shifts`` builds it from ``make_tasks``). What is the family's
own lives here: one task per split reading ``DIR/data/<split>.parquet``, the groups, and the family facts
each task carries under ``metadata`` (``lmms_emi_family``, ``lmms_emi_id_task``, ``lmms_emi_shift_kind``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmms_emi import scenarios as sc
from lmms_emi._io import atomic_write_text
from lmms_emi.shifts.family import SHIFT_KINDS, FamilySpec, FamilySplit
from lmms_emi.shifts.write import split_path

__all__ = ["TASKS_DIR", "TaskYamlKit", "family_task_files", "write_family_tasks"]

TASKS_DIR = "tasks"
BASE_FILE = "_base.yaml"


@dataclass(frozen=True)
class TaskYamlKit:
    """The plugin's task YAML pieces: ``base`` (shared settings, incl. the metric list), ``group(name,
    members)`` (a group with the EMI aggregations), ``function`` (the ``!function`` prefix of the task
    functions' module), ``quote`` (a YAML string scalar), ``header`` (the generated-file comment)."""

    base: str
    group: Callable[[str, list[str]], str]
    function: str
    quote: Callable[[str], str]
    header: str = ""


def _task_yaml(kit: TaskYamlKit, spec: FamilySpec, split: FamilySplit, data_file: Path) -> str:
    return (
        kit.header
        + f"include: {BASE_FILE}\n"
        + f"task: {split.task}\n"
        + "dataset_path: parquet\n"
        + f"dataset_kwargs:\n  data_files:\n    test: {kit.quote(str(data_file))}\n"
        + "test_split: test\n"
        + "metadata:\n  version: 0.1\n"
        + f"  {sc.FAMILY_KEY}: {spec.family}\n"
        + f"  {sc.ID_TASK_KEY}: {spec.id_task}\n"
        + f"  {sc.SHIFT_KIND_KEY}: {split.kind}\n"
    )


def family_task_files(spec: FamilySpec, out_dir: Path, kit: TaskYamlKit) -> dict[Path, str]:
    """Path -> text of every YAML of the family (the data files are named by absolute path)."""
    root = Path(os.path.abspath(out_dir))
    folder = root / TASKS_DIR
    files = {folder / BASE_FILE: kit.base}
    splits = spec.splits()
    for s in splits:
        files[folder / f"{s.task}.yaml"] = _task_yaml(kit, spec, s, split_path(root, s.split))
    top = [spec.id_task]
    for kind in SHIFT_KINDS:
        members = [s.task for s in splits if s.kind == kind]
        if members:
            files[folder / f"{spec.subgroup(kind)}.yaml"] = kit.group(spec.subgroup(kind), members)
            top.append(spec.subgroup(kind))
    files[folder / f"{spec.family}.yaml"] = kit.group(spec.family, top)
    return files


def write_family_tasks(spec: FamilySpec, out_dir: Path, kit: TaskYamlKit) -> list[Path]:
    """Write the family's YAMLs (atomically; YAMLs of splits no longer in the family are removed)."""
    files = family_task_files(spec, out_dir, kit)
    folder = Path(os.path.abspath(out_dir)) / TASKS_DIR
    if folder.is_dir():
        for old in folder.glob("*.yaml"):
            if old not in files:
                old.unlink()
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)
