"""Run-specific task YAMLs: the plugin's tasks pointed at a local dataset copy, and the EMI metric attached to
other lmms-eval tasks (``--metrics emi``).

lmms-eval 0.7.3 loads a task's data with ``datasets.load_from_disk(dataset_path)`` when
``dataset_kwargs.load_from_disk`` is true, else ``datasets.load_dataset(dataset_path, **dataset_kwargs)``
(so a local parquet copy is ``dataset_path: parquet`` + ``data_files``). Each benchmark's location lives
in one file, ``<benchmark>/_dataset.yaml``; an override copies the task tree into a run folder and rewrites
that file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lmms_emi import scenarios as sc
from lmms_emi.harness import make_tasks


class DataPathError(ValueError):
    """A ``--data`` path that is not a usable local copy of a benchmark."""


def _splits_of_saved(path: Path) -> list[str]:
    meta = path / "dataset_dict.json"
    if meta.is_file():
        return list(json.loads(meta.read_text(encoding="utf-8")).get("splits", []))
    return []


def _parquet_files(path: Path) -> dict[str, list[str]]:
    """``{split: [files]}`` of a parquet copy: ``<split>.parquet`` or ``data/<split>-*.parquet`` (hub)."""
    known = {s.split for b in sc.TASK_PREFIX for s in sc.scenarios(b)}
    found: dict[str, list[str]] = {}
    for file in sorted(path.rglob("*.parquet")):
        stem = file.stem
        split = next(
            (s for s in sorted(known, key=len, reverse=True) if stem == s or stem.startswith(s + "-")), None
        )
        if split is not None:
            found.setdefault(split, []).append(str(file.resolve()))
    return found


def local_dataset(path: str | Path) -> tuple[str, dict[str, Any], list[str]]:
    """(dataset_path, dataset_kwargs, split names) for lmms-eval from a local copy of a benchmark:
    a ``DatasetDict.save_to_disk`` folder or a folder of parquet files named after the splits."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataPathError(f"--data {path}: no such file or directory")
    p = p.resolve()
    splits = _splits_of_saved(p)
    if splits:
        return str(p), {"load_from_disk": True}, splits
    files = _parquet_files(p) if p.is_dir() else {}
    if files:
        return "parquet", {"data_files": files}, list(files)
    raise DataPathError(
        f"--data {path}: not a local copy of a LLaVA-Bench shift dataset (expected a "
        "DatasetDict.save_to_disk folder or parquet files named after the splits)"
    )


def benchmark_of_splits(splits: list[str]) -> str | None:
    """The benchmark whose split names these are (None if none matches)."""
    best, best_n = None, 0
    for benchmark in sc.TASK_PREFIX:
        names = {s.split for s in sc.scenarios(benchmark)}
        n = sum(1 for s in splits if s in names)
        if n > best_n:
            best, best_n = benchmark, n
    return best


def parse_data_args(values: list[str]) -> dict[str, tuple[str, dict[str, Any], list[str]]]:
    """``--data [BENCHMARK=]PATH`` values -> {benchmark: (dataset_path, dataset_kwargs, splits)}."""
    out: dict[str, tuple[str, dict[str, Any], list[str]]] = {}
    for value in values:
        benchmark, sep, path = value.partition("=")
        if not sep or benchmark not in sc.TASK_PREFIX:
            benchmark, path = "", value
        spec = local_dataset(path)
        if not benchmark:
            benchmark = benchmark_of_splits(spec[2]) or ""
            if not benchmark:
                raise DataPathError(
                    f"--data {path}: its splits ({', '.join(spec[2][:3])}, ...) are not LLaVA-Bench shift "
                    "splits; name the benchmark as --data synthetic=PATH or natural=PATH"
                )
        out[benchmark] = spec
    return out


def build_include_dir(
    run_dir: Path, data: dict[str, tuple[str, dict[str, Any], list[str]]], source: Path
) -> Path:
    """Copy the task tree ``source`` into ``run_dir/tasks`` with each overridden benchmark's dataset location
    rewritten; return the new tasks folder (to pass as ``--include_path``)."""
    dest = run_dir / "tasks"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for benchmark, (dataset_path, dataset_kwargs, _splits) in data.items():
        target = dest / make_tasks.TASKS_SUBDIR / benchmark / make_tasks.DATASET_FILE
        target.write_text(make_tasks.dataset_yaml(dataset_path, dataset_kwargs), encoding="utf-8")
    return dest


def foreign_task_yaml(task: str) -> str:
    """Config merged by lmms-eval over a built-in task's own: EMI metrics instead of its (judge) metrics."""
    fn = make_tasks.FN
    metrics = "".join(
        f"  - metric: {name}\n    aggregation: {fn}.agg_{name}\n    higher_is_better: {str(hib).lower()}\n"
        for name, hib in make_tasks.TASK_METRICS
    )
    return (
        make_tasks.HEADER
        + f"task: {task}\n"
        + f"process_docs: {fn}.process_docs__{task}\n"
        + f"process_results: {fn}.process_results\n"
        + "metric_list:\n"
        + metrics
    )
