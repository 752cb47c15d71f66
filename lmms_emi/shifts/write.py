"""Writing a shift family: one parquet file per split, resumable per split, images in a worker pool.

Layout of the output folder::

    DIR/manifest.json              every transform and its parameters, the splits (rows, sha256), versions
    DIR/data/<split>.parquet       question_id, image (datasets.Image), question, reference_answer
    DIR/.make_shifts_progress.json while a run is unfinished: its configuration and the finished splits

The splits are made one visual shift at a time: one pass over the source computes each row's corrupted
image once (in the worker pool) and writes it into every split that has that visual shift (``frost_3``,
``frost_3_sr_4``, ...). A split's file appears (atomically) only when it is complete, and is then recorded
in the progress file, so an interrupted run, started again with the same options, skips the finished
splits. Memory holds a bounded window of rows (about ``4 x workers + BATCH``), never the source.

Deterministic: the same source, options and package versions give byte-identical files and manifest (no
timestamps anywhere).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_emi._io import atomic_write_text
from lmms_emi.errors import UsageError
from lmms_emi.shifts.compat import applied_fixes
from lmms_emi.shifts.family import FamilySpec, FamilySplit, package_versions, row_seed
from lmms_emi.shifts.source import BATCH, Source, SourceRow
from lmms_emi.shifts.visual import VisualShift, corrupt_image_bytes

__all__ = ["MANIFEST", "FamilyResult", "make_family", "split_path"]

MANIFEST = "manifest.json"
PROGRESS = ".make_shifts_progress.json"
DATA_DIR = "data"
FORMAT = "lmms-emi shift family 1"


def split_path(out_dir: Path, split: str) -> Path:
    return out_dir / DATA_DIR / f"{split}.parquet"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _features() -> Any:
    import datasets

    return datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "reference_answer": datasets.Value("string"),
        }
    )


class _SplitWriter:
    """Rows of one split into a temp parquet file, published atomically by :meth:`close`."""

    def __init__(self, path: Path, schema: Any) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.writer = pq.ParquetWriter(str(self.tmp), schema)
        self.buffer: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= BATCH:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _corrupt_job(args: tuple[bytes, str, int, int]) -> bytes:
    data, corruption, severity, seed = args
    return corrupt_image_bytes(data, corruption, severity, seed)


def _bounded_map(
    fn: Callable[[Any], Any], items: Iterable[Any], pool: cf.Executor | None, window: int
) -> Iterator[Any]:
    """``map(fn, items)`` in order, at most ``window`` items in flight (the input is consumed lazily)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque[cf.Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass
class FamilyResult:
    out_dir: Path
    manifest: dict[str, Any]
    written: list[str]  # splits written by this call
    skipped: list[str]  # splits an earlier run had finished


def _config(spec: FamilySpec, source: Source) -> dict[str, Any]:
    """What decides the family's bytes: a rerun resumes only when this is equal."""
    return {
        "format": FORMAT,
        **spec.describe(),
        "source": source.describe(),
        "packages": package_versions(),
        "imagecorruptions_fixes": applied_fixes() if spec.visual else [],
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in {*a, *b} if a.get(k) != b.get(k))


def _resume_state(out_dir: Path, config: dict[str, Any], overwrite: bool) -> dict[str, dict[str, Any]]:
    """The splits an earlier run of the same configuration finished (name -> {rows, sha256}), checked
    against their files; UsageError when ``out_dir`` holds another family (unless ``overwrite``)."""
    done: dict[str, dict[str, Any]] = {}
    for name in (PROGRESS, MANIFEST):
        state = _read_json(out_dir / name)
        if state is None:
            continue
        earlier = state.get("config") if name == PROGRESS else {k: state.get(k) for k in config}
        if earlier != config:
            if overwrite:  # the other family's split files go; a rerun must not mix two families
                for old in (out_dir / DATA_DIR).glob("*.parquet"):
                    old.unlink()
                return {}
            diff = _differences(earlier or {}, config)
            raise UsageError(
                f"--output-path {out_dir}: holds a shift family made with other settings ({', '.join(diff)} "
                "differ); give another folder or --overwrite"
            )
        records = state.get("done") if name == PROGRESS else {s["split"]: s for s in state.get("splits", [])}
        for split, record in (records or {}).items():
            path = split_path(out_dir, split)
            if path.is_file() and _sha256(path) == record.get("sha256"):
                done[split] = {"rows": record["rows"], "sha256": record["sha256"]}
        return done
    if not overwrite and (out_dir / DATA_DIR).is_dir() and any((out_dir / DATA_DIR).iterdir()):
        raise UsageError(
            f"--output-path {out_dir}: its data/ folder holds files make-shifts did not record; give another "
            "folder or --overwrite"
        )
    return done


def make_family(
    source: Source,
    spec: FamilySpec,
    out_dir: str | os.PathLike,
    *,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    validate: bool = True,
    on_split_done: Callable[[str], None] | None = None,
) -> FamilyResult:
    """Write every split of ``spec`` made from ``source`` into ``out_dir`` (see the module docstring).

    ``workers``: processes for the image corruptions (0: in this process). ``validate``: the cheap pass over
    the source first (columns, texts, images), so bad input stops the run before any split is written.
    ``on_split_done(split)`` is called after each split is published (progress hooks, tests).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if validate or source.n_rows is None:
        source.validate(progress=progress)
    for shift in spec.text:  # builds each augmenter (the synonym source is checked here), before any work
        shift.augmenter_object()
    config = _config(spec, source)
    done = _resume_state(out, config, overwrite)
    skipped = [s.split for s in spec.splits() if s.split in done]
    written: list[str] = []
    schema = _features().arrow_schema

    def save_progress() -> None:
        atomic_write_text(
            out / PROGRESS, json.dumps({"config": config, "done": done}, indent=1, sort_keys=True)
        )

    out.mkdir(parents=True, exist_ok=True)
    save_progress()
    pool: cf.Executor | None = None
    if workers > 0:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for visual, splits in spec.visual_groups():
            todo = [s for s in splits if s.split not in done]
            if not todo:
                continue
            written_now = _write_group(source, spec, out, visual, todo, schema, pool, workers, progress, tqdm)
            for split, record in written_now:
                done[split] = record
                written.append(split)
                save_progress()
                if on_split_done is not None:
                    on_split_done(split)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    manifest = {
        **config,
        "splits": [
            {
                "split": s.split,
                "task": s.task,
                "kind": s.kind,
                "visual": s.visual.name if s.visual else None,
                "text": s.text.name if s.text else None,
                "file": f"{DATA_DIR}/{s.split}.parquet",
                **done[s.split],
            }
            for s in spec.splits()
        ],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (out / PROGRESS).unlink(missing_ok=True)
    return FamilyResult(out, manifest, written, skipped)


def _write_group(
    source: Source,
    spec: FamilySpec,
    out: Path,
    visual: VisualShift | None,
    todo: list[FamilySplit],
    schema: Any,
    pool: cf.Executor | None,
    workers: int,
    progress: bool,
    tqdm: Any,
) -> list[tuple[str, dict[str, Any]]]:
    """One pass over the source writing the splits ``todo`` (all with the visual shift ``visual``)."""
    writers = {s.split: _SplitWriter(split_path(out, s.split), schema) for s in todo}
    rows_a, rows_b = _tee(source.rows())

    def job(row: SourceRow) -> tuple[bytes, str, int, int]:
        assert visual is not None
        return (
            row.image,
            visual.corruption,
            visual.severity,
            row_seed(spec.seed, visual.corruption, row.index),
        )

    if visual is None:
        images: Iterator[bytes] = (row.image for row in rows_b)
    else:
        images = _bounded_map(_corrupt_job, (job(r) for r in rows_b), pool, window=4 * max(workers, 1))
    label = visual.name if visual else "id + text"
    try:
        for row, image in tqdm(
            zip(rows_a, images, strict=True),
            total=source.n_rows,
            desc=f"{spec.family}: {label}",
            unit="row",
            disable=not progress,
        ):
            for s in todo:
                question = row.question
                if s.text is not None:
                    question = s.text.apply(row.question, row_seed(spec.seed, s.text.augmenter, row.index))
                writers[s.split].add(
                    {
                        "question_id": row.index,
                        "image": {"bytes": image, "path": None},
                        "question": question,
                        "reference_answer": row.reference_answer,
                    }
                )
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    published = []
    for s in todo:
        writer = writers[s.split]
        writer.close()
        published.append((s.split, {"rows": writer.rows, "sha256": _sha256(writer.path)}))
    return published


def _tee(rows: Iterator[SourceRow]) -> tuple[Iterator[SourceRow], Iterator[SourceRow]]:
    """Two iterators over ``rows`` for the writer and the pool's feeder; rows the feeder read ahead wait
    in a queue bounded by the pool's window."""
    import itertools

    return itertools.tee(rows, 2)
