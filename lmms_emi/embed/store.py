"""The run embeddings file: every task's embeddings in one safetensors file (input of ``train-estimator``).

Keys ``<task>/z_v``, ``<task>/z_t``, ``<task>/z_model``, ``<task>/z_ref``; the metadata carries a format
marker, the task order, the encoder spec and free-form ``extra`` (model name, run folder, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmms_emi._io import atomic_write
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import UsageError

__all__ = ["EMBEDDINGS_FILE", "load_embeddings", "save_embeddings"]

EMBEDDINGS_FILE = "emi_embeddings.safetensors"
FORMAT = "lmms-emi-embeddings"
_FIELDS = ("z_v", "z_t", "z_model", "z_ref")


def save_embeddings(
    task_embeddings: Mapping[str, TaskEmbeddings],
    path: str | Path,
    *,
    encoders: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save per-task embeddings as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for task, emb in task_embeddings.items():
        for name, z in zip(_FIELDS, emb, strict=True):
            if z is not None:
                tensors[f"{task}/{name}"] = torch.as_tensor(z).detach().to("cpu", torch.float32).clone()
    metadata = {
        "format": FORMAT,
        "version": "1",
        "encoders": json.dumps(dict(encoders or {}), sort_keys=True),
        "tasks": json.dumps(list(task_embeddings)),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_embeddings(path: str | Path) -> tuple[dict[str, TaskEmbeddings], dict[str, Any]]:
    """Read a file written by :func:`save_embeddings`: (task embeddings in saved order, encoder spec)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path} is not an lmms-emi embeddings file ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lmms-emi embeddings file (no format marker)")
    tasks = _meta_json(path, meta, "tasks", "[]")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise UsageError(f"{path}: metadata 'tasks' must be a list of task names, got {tasks!r:.80}")
    encoders = _meta_json(path, meta, "encoders", "{}")
    if not isinstance(encoders, dict):
        raise UsageError(f"{path}: metadata 'encoders' must be a JSON object, got {encoders!r:.80}")
    out = {task: TaskEmbeddings(*(tensors.get(f"{task}/{name}") for name in _FIELDS)) for task in tasks}
    _check_shapes(path, out)
    return out, encoders


def _meta_json(path: Path, meta: Mapping[str, str], key: str, default: str) -> Any:
    try:
        return json.loads(meta.get(key, default))
    except ValueError as exc:
        raise UsageError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from None


def _check_shapes(path: Path, tasks: Mapping[str, TaskEmbeddings]) -> None:
    """Every task: z_v and z_t present, every field 2-D with one row per sample; every field of one dim
    across the file's tasks (they are pooled into one estimator's training set)."""
    dims: dict[str, tuple[int, str]] = {}
    for task, emb in tasks.items():
        if emb.z_v is None or emb.z_t is None:
            raise UsageError(f"{path}: task {task!r} has no z_v / z_t tensors; the file is incomplete")
        n = emb.z_v.shape[0] if emb.z_v.ndim == 2 else -1
        for name, z in zip(_FIELDS, emb, strict=True):
            if z is None:
                continue
            if z.ndim != 2 or z.shape[0] != n:
                got = f"{z.shape[0]} rows" if z.ndim == 2 else f"shape {tuple(z.shape)}"
                raise UsageError(f"{path}: task {task!r}: {name} has {got} but z_v has {n}")
            want = dims.setdefault(name, (z.shape[1], task))
            if z.shape[1] != want[0]:
                raise UsageError(
                    f"{path}: task {task!r}: {name} has dim {z.shape[1]} but task {want[1]!r} has {want[0]}"
                )
