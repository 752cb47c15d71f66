"""Run-specific task YAMLs: the plugin's tasks pointed at a local dataset copy (``--data``), and the EMI
metric attached to other lmms-eval tasks (``--metrics emi``).

Each benchmark's dataset location lives in one file, ``<benchmark>/_dataset.yaml``; an override copies the
task tree into a run folder and rewrites that file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmms_emi import scenarios as sc
from lmms_emi.errors import DataPathError
from lmms_emi.harness import make_tasks
from lmms_emi.sources.datasets import LocalDataset, local_dataset

__all__ = ["build_include_dir", "foreign_task_yaml", "parse_data_args"]


def parse_data_args(values: list[str]) -> dict[str, LocalDataset]:
    """``--data [BENCHMARK=]PATH`` values -> {benchmark: local copy}."""
    out: dict[str, LocalDataset] = {}
    for value in values:
        benchmark, sep, path = value.partition("=")
        if not sep or benchmark not in sc.TASK_PREFIX:
            benchmark, path = "", value
        local = local_dataset(path)
        if not benchmark:
            benchmark = sc.benchmark_of_splits(local.splits) or ""
            if not benchmark:
                raise DataPathError(
                    f"--data {path}: its splits ({', '.join(local.splits[:3])}, ...) are not LLaVA-Bench "
                    "shift splits; name the benchmark as --data synthetic=PATH or natural=PATH"
                )
        out[benchmark] = local
    return out


def build_include_dir(run_dir: Path, data: dict[str, LocalDataset], source: Path) -> Path:
    """Copy the task tree ``source`` into ``run_dir/tasks`` with each overridden benchmark's dataset location
    rewritten; return the new tasks folder (to pass as ``--include_path``)."""
    dest = run_dir / "tasks"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for benchmark, local in data.items():
        target = dest / make_tasks.TASKS_SUBDIR / benchmark / make_tasks.DATASET_FILE
        target.write_text(make_tasks.dataset_yaml(local.path, local.kwargs), encoding="utf-8")
    return dest


def foreign_task_yaml(task: str) -> str:
    """Config merged by lmms-eval over another task's own: only its ``process_docs`` (the EMI columns); its
    own ``process_results`` and ``metric_list`` stay, and the EMI metrics are added beside them
    (:mod:`lmms_emi.harness.patches`)."""
    return make_tasks.HEADER + f"task: {task}\n" + f"process_docs: {make_tasks.FN}.process_docs__{task}\n"
