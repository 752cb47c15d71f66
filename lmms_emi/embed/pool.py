"""Pooling the saved embeddings of several runs into one training set for an estimator, each sample once.

A sample (its image, query, response and reference embeddings) already pooled from an earlier file
(``analyze`` writes a copy of an ``eval`` run's embeddings into the same folder; a run may be named twice)
is skipped by its content fingerprint. Used by ``lmms-emi train-estimator`` and by ``lmms-emi leaderboard
--common-estimator``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmms_emi.embed.store import EMBEDDINGS_FILE, load_embeddings
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.encoder_spec import spec_differences
from lmms_emi.errors import UsageError

__all__ = ["PooledEmbeddings", "embedding_files", "pool_embeddings", "sample_fingerprints"]


def embedding_files(paths: Sequence[str | Path]) -> list[Path]:
    """The embeddings files named by ``paths``: files as given, folders searched recursively for
    ``*emi_embeddings.safetensors``. UsageError for a missing path or a folder without one."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(p.rglob(f"*{EMBEDDINGS_FILE}"))  # <run id>_emi_embeddings.safetensors too
            if not found:
                raise UsageError(f"{p} holds no {EMBEDDINGS_FILE} (written by `lmms-emi score` / `analyze`)")
            files.extend(found)
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


def sample_fingerprints(emb: TaskEmbeddings) -> list[str]:
    """One sha256 per sample over its rows of every field (float32 bytes; a missing field counts)."""
    fields = [None if z is None else z.detach().to("cpu", torch.float32).contiguous().numpy() for z in emb]
    out = []
    for i in range(emb.n):
        h = hashlib.sha256()
        for z in fields:
            h.update(b"-" if z is None else z[i].tobytes())
        out.append(h.hexdigest())
    return out


def _dims(emb: TaskEmbeddings) -> tuple[int | None, ...]:
    return tuple(None if z is None else int(z.shape[1]) for z in emb)


@dataclass
class PooledEmbeddings:
    """The pooled samples (``tasks``: ``"<file index>:<task>"`` -> the new samples of that task), the encoder
    spec they share, the files they came from (``sources``: file -> its tasks, in file order, all of its
    samples) and one line per file saying what was pooled from it (``log``)."""

    tasks: dict[str, TaskEmbeddings]
    spec: dict[str, Any]
    sources: dict[Path, dict[str, TaskEmbeddings]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return sum(2 * e.n for e in self.tasks.values() if e.z_model is not None and e.z_ref is not None)


def pool_embeddings(files: Sequence[Path]) -> PooledEmbeddings:
    """Pool every task of every file, each sample once (by :func:`sample_fingerprints`). UsageError when a
    file used other encoders than the first or has embeddings of other dims, or when nothing is pooled."""
    pooled: dict[str, TaskEmbeddings] = {}
    sources: dict[Path, dict[str, TaskEmbeddings]] = {}
    log: list[str] = []
    spec: dict[str, Any] | None = None
    first: Path | None = None
    seen: set[str] = set()
    dims: tuple[tuple[int | None, ...], str] | None = None
    for i, path in enumerate(files):
        tasks, file_spec = load_embeddings(path)
        sources[path] = tasks
        if spec is None:
            spec, first = file_spec, path
        elif problems := spec_differences(spec, file_spec, expected_label="first file", actual_label="this"):
            raise UsageError(f"{path} used other encoders than {first}: {'; '.join(problems[:3])}")
        new_samples = new_tasks = 0
        total = sum(e.n for e in tasks.values())
        for task, emb in tasks.items():
            dv, dt, dm, dr = _dims(emb)
            shape = (dv, dt, dm or dr)
            if dims is None:
                dims = (shape, f"{path} task {task!r}")
            elif shape != dims[0]:
                raise UsageError(
                    f"{path} task {task!r}: embeddings of dims {shape} (image, query, response), but "
                    f"{dims[1]} has {dims[0]}; pool runs embedded with the same encoders"
                )
            keep = []
            for row, fp in enumerate(sample_fingerprints(emb)):
                if fp not in seen:
                    seen.add(fp)
                    keep.append(row)
            if keep:
                pooled[f"{i}:{task}"] = emb if len(keep) == emb.n else emb.subset(keep)
                new_samples, new_tasks = new_samples + len(keep), new_tasks + 1
        skipped = f"; {total - new_samples} already pooled, skipped" if new_samples < total else ""
        log.append(f"pooled {new_samples} of {total} samples ({new_tasks} tasks) from {path}{skipped}")
    if spec is None or not pooled:
        raise UsageError("no samples to fit on")
    return PooledEmbeddings(pooled, spec, sources, log)
