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
    out = {
        task: TaskEmbeddings(*(tensors.get(f"{task}/{name}") for name in _FIELDS))
        for task in json.loads(meta.get("tasks", "[]"))
    }
    return out, json.loads(meta.get("encoders", "{}"))
