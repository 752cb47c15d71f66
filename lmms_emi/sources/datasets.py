"""Datasets of a run: local copies (a ``DatasetDict.save_to_disk`` folder or parquet files named after the
splits) or the Hugging Face hub; the dataset columns a sample is read from; the image column as stored.

lmms-eval 0.7.3 loads a task's data with ``datasets.load_from_disk(dataset_path)`` when
``dataset_kwargs.load_from_disk`` is true, else ``datasets.load_dataset(dataset_path, **dataset_kwargs)``
(so a local parquet copy is ``dataset_path: parquet`` + ``data_files``): :func:`local_dataset` returns
exactly those two, and :func:`load_split` reads a split back the same way.

A split is a ``datasets.Dataset`` or, for a ``save_to_disk`` folder, the ``pyarrow.Table`` that
``load_from_disk`` would wrap (:func:`saved_splits` reads the same memory-mapped Arrow files without
importing ``datasets``: the measured reason is above ``_read_saved_split``). Both have ``column_names`` and
``len``; read columns with :func:`column_values`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_emi import scenarios as sc
from lmms_emi.environment import quiet_hub
from lmms_emi.errors import DataPathError, UsageError

__all__ = [
    "IMAGE_COLUMNS",
    "QUESTION_COLUMNS",
    "REFERENCE_COLUMNS",
    "ColumnNames",
    "LocalDataset",
    "column_values",
    "encoded_images",
    "load_split",
    "load_splits",
    "local_dataset",
    "quiet_hub",
    "saved_splits",
]

QUESTION_COLUMNS = ("question", "prompt", "instruction", "text")
REFERENCE_COLUMNS = ("reference_answer", "gpt_answer", "answer", "reference", "caption")
IMAGE_COLUMNS = ("image", "images", "img")


@dataclass(frozen=True)
class LocalDataset:
    """A local copy as lmms-eval loads it: ``dataset_path``, ``dataset_kwargs``, and the split names."""

    path: str
    kwargs: dict[str, Any]
    splits: list[str]


def _splits_of_saved(path: Path) -> list[str]:
    meta = path / "dataset_dict.json"
    if meta.is_file():
        return list(json.loads(meta.read_text(encoding="utf-8")).get("splits", []))
    return []


def _parquet_files(path: Path) -> dict[str, list[str]]:
    """``{split: [files]}`` of a parquet copy: ``<split>.parquet`` or ``data/<split>-*.parquet`` (hub)."""
    found: dict[str, list[str]] = {}
    for file in sorted(path.rglob("*.parquet")):
        split = sc.split_prefix(file.stem, separator="-")
        if split is not None and sc.parse_split(split) is not None:
            found.setdefault(split, []).append(str(file.resolve()))
    return found


def local_dataset(path: str | Path, *, option: str = "--data") -> LocalDataset:
    """lmms-eval's view of a local copy of a benchmark (``option`` names the flag in error messages)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataPathError(f"{option} {path}: no such file or directory")
    p = p.resolve()
    splits = _splits_of_saved(p)
    if splits:
        return LocalDataset(str(p), {"load_from_disk": True}, splits)
    files = _parquet_files(p) if p.is_dir() else {}
    if files:
        return LocalDataset("parquet", {"data_files": files}, list(files))
    raise DataPathError(
        f"{option} {path}: not a local copy of a LLaVA-Bench shift dataset (expected a "
        "DatasetDict.save_to_disk folder or parquet files named after the splits)"
    )


def load_split(dataset_path: str, split: str, dataset_kwargs: Mapping[str, Any] | None = None) -> Any:
    """One split, loaded as lmms-eval loads it (``load_from_disk``, through :func:`saved_splits`, or
    ``load_dataset``)."""
    kwargs = dict(dataset_kwargs or {})
    if kwargs.pop("load_from_disk", False):
        return saved_splits(dataset_path, [split])[split]
    import datasets

    kwargs = {k: v for k, v in kwargs.items() if k in ("data_files", "name", "revision", "data_dir")}
    if "data_files" in kwargs and isinstance(kwargs["data_files"], Mapping):
        kwargs["data_files"] = {split: kwargs["data_files"][split]}
    with quiet_hub():
        return datasets.load_dataset(dataset_path, split=split, **kwargs)


# Reading a save_to_disk folder without importing ``datasets``: the one private-layout trick kept. Measured
# on the warm full-size ``benchmarks/bench_score.py`` (2 CPUs under load, 2026-12-06, medians of 5-6
# alternating runs): the data step takes 0.2-0.3 s this way and 1.0-1.2 s with one
# ``datasets.load_from_disk`` (importing datasets, pandas, fsspec, huggingface_hub), 0.75-0.8 s or ~15 %
# of the ~5 s warm wall time (1.3 s of CPU). No public API reads these folders without importing
# ``datasets``: pyarrow reads the Arrow stream files, but which files make a split is ``datasets``' own
# ``state.json`` (``_data_files``), so any layout this does not know goes to ``datasets.load_from_disk``.
def _read_saved_split(folder: Path) -> Any:
    """One split folder of a ``save_to_disk`` copy as a ``pyarrow.Table`` (its ``state.json`` lists the Arrow
    stream files ``load_from_disk`` memory-maps and concatenates), or None for a layout this does not know."""
    import pyarrow as pa

    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not files or state.get("_indices_data_files"):
        return None
    tables = [pa.ipc.open_stream(pa.memory_map(str(file))).read_all() for file in files]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def saved_splits(path: str | Path, splits: Sequence[str]) -> dict[str, Any]:
    """``{split: table}`` of a ``DatasetDict.save_to_disk`` folder: the Arrow tables ``load_from_disk`` would
    give (rows and columns as stored), read without importing ``datasets``; a split folder of an unknown
    layout is loaded by ``datasets.load_from_disk`` instead."""
    root = Path(path)
    out: dict[str, Any] = {}
    for split in splits:
        table = _read_saved_split(root / split)
        if table is None:
            import datasets

            saved = datasets.load_from_disk(str(root))
            return {s: saved[s] for s in splits}
        out[split] = table
    return out


def column_values(split: Any, column: str, rows: Sequence[int] | None = None) -> list[Any]:
    """A column of a split (``datasets.Dataset`` or ``pyarrow.Table``) as Python values, in one Arrow pass:
    values as stored, so an image column gives its ``{"bytes", "path"}`` records, never decoded pixels.
    ``rows``: only these row numbers, in this order."""
    if not hasattr(split, "with_format"):  # a pyarrow.Table
        table = split if rows is None else split.take(list(rows))
        return table.column(column).to_pylist()
    if rows is not None:
        split = split.select(rows)
    return split.with_format("arrow")[column].to_pylist()


def load_splits(dataset: str | None, benchmark: str, splits: Sequence[str]) -> dict[str, Any]:
    """{split: table or datasets.Dataset} from a local copy (``--dataset PATH``; a ``save_to_disk`` folder is
    read by :func:`saved_splits`) or the benchmark's hub dataset."""
    source = dataset or sc.DATASET[benchmark]
    local = None
    if Path(source).expanduser().exists():
        local = local_dataset(source, option="--dataset")
        missing = [s for s in splits if s not in local.splits]
        if missing:
            shown = ", ".join(local.splits[:4]) + (", ..." if len(local.splits) > 4 else "")
            raise UsageError(
                f"dataset {source} has no split {missing[0]!r} ({len(missing)} missing; it has "
                f"{shown}); restrict with --scenarios"
            )
        if local.kwargs.get("load_from_disk"):  # read without datasets: no progress bars to quiet
            return saved_splits(local.path, splits)
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        if local is not None:
            return {s: load_split(local.path, s, local.kwargs) for s in splits}
        out = {}
        for split in splits:
            try:
                out[split] = load_split(source, split)
            except Exception as exc:  # offline / unknown id / missing split: many exception types
                raise UsageError(
                    f"dataset {source!r} is not reachable ({type(exc).__name__}): scoring needs the "
                    "Hugging Face hub (online) or a local path given with --dataset (a "
                    "DatasetDict.save_to_disk folder or parquet files)"
                ) from None
        return out
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@dataclass(frozen=True)
class ColumnNames:
    """Dataset columns chosen by the user (None: the first of the usual names that is present)."""

    question: str | None = None
    reference: str | None = None
    image: str | None = None

    def resolve(self, ds: Any, split: str) -> tuple[str, str | None, str]:
        """(question, reference or None, image) column names of ``ds``."""
        q_col = _column(ds, QUESTION_COLUMNS, self.question, split)
        r_col = _column(ds, REFERENCE_COLUMNS, self.reference, split)
        i_col = _column(ds, IMAGE_COLUMNS, self.image, split)
        if q_col is None or i_col is None:
            raise UsageError(
                f"split {split}: no {'question' if q_col is None else 'image'} column among "
                f"{', '.join(ds.column_names)} (name it with --question-column / --image-column)"
            )
        return q_col, r_col, i_col


def _column(ds: Any, candidates: Sequence[str], override: str | None, split: str) -> str | None:
    if override:
        if override not in ds.column_names:
            raise UsageError(f"split {split}: no column {override!r} (columns: {', '.join(ds.column_names)})")
        return override
    return next((c for c in candidates if c in ds.column_names), None)


def encoded_images(ds: Any, column: str, rows: Sequence[int] | None = None) -> list[Any]:
    """The image column as stored (encoded bytes / path dicts, not decoded PIL images): the embedder decodes
    and hashes them, so every entry point sees identical inputs."""
    return column_values(ds, column, rows)
