"""Reading the source of a shift family row by row, in bounded memory.

A source holds an image, a question and a reference answer per row (columns ``image``, ``question``,
``reference_answer`` unless mapped) and is one of

* a JSONL file: one object per line; the image column holds a file path (relative to the JSONL's folder, or
  absolute);
* parquet: a ``.parquet`` file or a folder of them (read in sorted order); the image column holds a
  ``datasets.Image`` struct (``bytes`` / ``path``), raw bytes or a file path;
* a ``datasets`` ``save_to_disk`` folder (memory-mapped);
* a dataset-hub name, streamed (``datasets.load_dataset(..., streaming=True)``).

Rows are yielded one at a time (parquet and hub sources in batches of :data:`BATCH` rows); no source is
ever held in memory whole. :meth:`Source.validate` is the cheap pass before any work: every row has the
columns, the texts are strings and the image opens (header only) with both sides >= 32 px.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_emi._io import json_lines
from lmms_emi.errors import DataPathError, UsageError
from lmms_emi.shifts.visual import MIN_SIDE

__all__ = ["BATCH", "Columns", "Source", "SourceRow", "open_source"]

BATCH = 64


@dataclass(frozen=True)
class Columns:
    """Which source columns hold the image, the question and the reference answer."""

    image: str = "image"
    question: str = "question"
    reference_answer: str = "reference_answer"

    def required(self) -> list[tuple[str, str]]:
        """(option, column) of every required column."""
        return [
            ("--image-column", self.image),
            ("--question-column", self.question),
            ("--reference-column", self.reference_answer),
        ]


@dataclass(frozen=True)
class SourceRow:
    index: int  # position in the source (0-based): the row's question_id and seed key
    image: bytes  # encoded image file
    question: str
    reference_answer: str


class Source:
    """A readable source; ``rows()`` can be called again (each call starts from the first row)."""

    def __init__(self, spec: str, kind: str, columns: Columns, split: str | None, raw_rows: Any) -> None:
        self.spec, self.kind, self.columns, self.split = spec, kind, columns, split
        self._raw_rows = raw_rows  # () -> iterator of (index, mapping, base folder for relative paths)
        self.n_rows: int | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.spec,
            "kind": self.kind,
            "split": self.split,
            "columns": {
                "image": self.columns.image,
                "question": self.columns.question,
                "reference_answer": self.columns.reference_answer,
            },
            "rows": self.n_rows,
        }

    def _where(self, index: int) -> str:
        split = f" split {self.split}" if self.split else ""
        return f"{self.spec}{split}: row {index}"

    def _row(self, index: int, raw: Any, base: Path | None) -> SourceRow:
        for option, column in self.columns.required():
            if column not in raw:
                raise UsageError(
                    f"{self._where(index)}: no column {column!r} ({option}; its columns: "
                    f"{', '.join(map(str, raw)) or 'none'})"
                )
        texts = []
        for option, column in self.columns.required()[1:]:
            value = raw[column]
            if not isinstance(value, str):
                raise DataPathError(
                    f"{self._where(index)}: column {column!r} ({option}) holds "
                    f"{type(value).__name__}, not text"
                )
            texts.append(value)
        image = self._image_bytes(index, raw[self.columns.image], base)
        return SourceRow(index, image, texts[0], texts[1])

    def _image_bytes(self, index: int, value: Any, base: Path | None) -> bytes:
        column = self.columns.image
        if isinstance(value, dict):  # datasets.Image struct
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            try:
                return path.read_bytes()
            except OSError as exc:
                raise DataPathError(
                    f"{self._where(index)}: column {column!r}: cannot read the image file {path} "
                    f"({exc.strerror or exc})"
                ) from None
        if hasattr(value, "save"):  # a decoded PIL image (a hub dataset that decodes)
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return buffer.getvalue()
        raise DataPathError(
            f"{self._where(index)}: column {column!r} holds {type(value).__name__}, not an image, its bytes "
            "or a file path"
        )

    def rows(self) -> Iterator[SourceRow]:
        """Every row, in source order."""
        for index, raw, base in self._raw_rows():
            yield self._row(index, raw, base)

    def check_image(self, row: SourceRow) -> None:
        """The image opens (header only) and is at least 32 x 32 px; DataPathError naming the row if not."""
        from PIL import Image, UnidentifiedImageError

        where = f"{self._where(row.index)}: column {self.columns.image!r}"
        try:
            with Image.open(io.BytesIO(row.image)) as img:
                width, height = img.size
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataPathError(f"{where}: unreadable image ({' '.join(str(exc).split())})") from None
        if min(width, height) < MIN_SIDE:
            raise DataPathError(
                f"{where}: the image is {width}x{height} px; imagecorruptions needs at least "
                f"{MIN_SIDE}x{MIN_SIDE}"
            )

    def validate(self, progress: bool = True) -> int:
        """The cheap pass over every row (columns, texts, image headers and sizes); returns the row count."""
        from tqdm.auto import tqdm

        count = 0
        for row in tqdm(self.rows(), desc="checking the source", unit="row", disable=not progress):
            self.check_image(row)
            count += 1
        if count == 0:
            raise DataPathError(f"{self.spec}: no rows")
        self.n_rows = count
        return count


# ------------------------------------------------------------------------------------------ the kinds
def _jsonl_rows(path: Path) -> Any:
    def rows() -> Iterator[tuple[int, Any, Path]]:
        for index, (_line_no, raw) in enumerate(json_lines(path, DataPathError)):
            yield index, raw, path.parent

    return rows


def _parquet_rows(files: list[Path], columns: Columns) -> Any:
    import pyarrow.parquet as pq

    def rows() -> Iterator[tuple[int, Any, Path]]:
        index = 0
        for file in files:
            handle = pq.ParquetFile(file)
            present = set(handle.schema_arrow.names)
            wanted = [c for _o, c in columns.required() if c in present]
            for batch in handle.iter_batches(batch_size=BATCH, columns=wanted):
                for raw in batch.to_pylist():
                    yield index, raw, file.parent
                    index += 1

    return rows


def _parquet_names(file: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(file).schema_arrow.names)
    except Exception as exc:
        raise DataPathError(f"{file}: not a readable parquet file ({' '.join(str(exc).split())})") from None


def _datasets_rows(dataset: Any, columns: Columns) -> Any:
    """Rows of a ``datasets`` Dataset / IterableDataset: the three columns, images as encoded bytes (a
    streamed dataset without known features is read as it comes; decoded images are re-encoded as PNG)."""
    import datasets

    if dataset.column_names:  # known schema: only the needed columns, images left undecoded
        present = set(dataset.column_names)
        if columns.image in present:
            dataset = dataset.cast_column(columns.image, datasets.Image(decode=False))
        dataset = dataset.select_columns([c for _o, c in columns.required() if c in present])

    def rows() -> Iterator[tuple[int, Any, None]]:
        index = 0
        for batch in dataset.iter(batch_size=BATCH):
            n = len(next(iter(batch.values()))) if batch else 0
            for i in range(n):
                yield index, {c: batch[c][i] for c in batch}, None
                index += 1

    return rows


def _check_columns(spec: str, columns: Columns, present: list[str] | None) -> None:
    """Every required column in the source's schema (when it has one), before any row is read."""
    if present is None:
        return
    for option, column in columns.required():
        if column not in present:
            raise UsageError(
                f"{spec}: no column {column!r} ({option}; its columns: {', '.join(present) or 'none'})"
            )


def _choose_split(spec: str, splits: list[str], split: str | None) -> str:
    if split is not None:
        if split not in splits:
            raise UsageError(f"--split {split}: {spec} has no such split (its splits: {', '.join(splits)})")
        return split
    if len(splits) == 1:
        return splits[0]
    raise UsageError(f"{spec} has several splits ({', '.join(splits)}): name one with --split")


def open_source(spec: str, columns: Columns | None = None, split: str | None = None) -> Source:
    """The source named by ``spec`` (a path or a dataset-hub name; see the module docstring)."""
    columns = columns or Columns()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
        first = next(iter(rows()), None)  # its keys are the schema a missing column is named against
        _check_columns(spec, columns, None if first is None else list(first[1]))
        return Source(spec, "jsonl", columns, None, rows)
    if path.is_file() and path.suffix.lower() == ".parquet":
        _check_columns(spec, columns, _parquet_names(path))
        return Source(spec, "parquet", columns, None, _parquet_rows([path], columns))
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            chosen = _choose_split(spec, list(loaded), split)
            _check_columns(spec, columns, loaded[chosen].column_names)
            return Source(spec, "save_to_disk", columns, chosen, _datasets_rows(loaded[chosen], columns))
        if (path / "state.json").is_file():
            single = datasets.load_from_disk(str(path))
            _check_columns(spec, columns, single.column_names)
            return Source(spec, "save_to_disk", columns, None, _datasets_rows(single, columns))
        files = sorted(path.rglob("*.parquet"))
        if files:
            _check_columns(spec, columns, _parquet_names(files[0]))
            return Source(spec, "parquet", columns, None, _parquet_rows(files, columns))
        raise DataPathError(
            f"{spec}: a folder with no dataset_dict.json / state.json (save_to_disk) and no .parquet files"
        )
    if path.exists() or spec.startswith((".", "/", "~")) or path.suffix:
        raise DataPathError(
            f"{spec}: not a source (give a .jsonl or .parquet file, a folder of parquet files, a "
            "save_to_disk folder or a dataset-hub name)"
        )
    import datasets

    try:
        loaded = datasets.load_dataset(spec, streaming=True)
    except Exception as exc:
        raise DataPathError(
            f"{spec}: cannot load it from the dataset hub ({' '.join(str(exc).split())[:300]})"
        ) from None
    chosen = _choose_split(spec, list(loaded), split)
    _check_columns(spec, columns, loaded[chosen].column_names)
    return Source(spec, "hub", columns, chosen, _datasets_rows(loaded[chosen], columns))
