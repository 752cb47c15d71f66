"""Content-addressed on-disk cache of embedding vectors.

Key: ``sha256(encoder cache id | layer | projection | content hash)``; one safetensors file per
entry at ``<root>/<key[:2]>/<key>.safetensors``.  The file's metadata carries the key and the
sha256 of the vector's bytes, so a truncated or corrupted entry is detected on read (and treated
as a miss: the caller recomputes and overwrites it).  Writes go through :func:`lmms_emi._io.atomic_write`
(a uniquely named temp file in the same directory, then ``os.replace``): readers never see half a file,
and concurrent writers of the same key (several ranks) simply race to an identical result.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from lmms_emi._io import atomic_write

_FORMAT = "lmms_emi.embedding.v1"


def default_cache_dir() -> Path:
    """``$LMMS_EMI_CACHE`` or ``~/.cache/lmms_emi/embeddings``."""
    env = os.environ.get("LMMS_EMI_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/lmms_emi/embeddings").expanduser()


def cache_key(encoder_id: str, layer: int, projection: str, content_hash: str) -> str:
    """The entry's address: sha256 over the encoder identity, layer, projection and content hash."""
    raw = f"{encoder_id}\x1f{layer}\x1f{projection}\x1f{content_hash}".encode()
    return hashlib.sha256(raw).hexdigest()


class EmbeddingCache:
    """Directory of verified embedding vectors (float32, 1-D)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, dim: int) -> tuple[torch.Tensor | None, bool]:
        """Return ``(vector, corrupt)``; ``vector`` is None on a miss or when the entry is bad
        (truncated, bit-flipped, wrong key/shape, non-finite): the caller recomputes and overwrites it."""
        rows, found, corrupt = self.get_many([key], dim)
        return (torch.from_numpy(rows[0]) if found[0] else None), bool(corrupt)

    def get_many(self, keys: Sequence[str], dim: int) -> tuple[np.ndarray, list[bool], int]:
        """Read many entries at once: ``(rows, found, corrupt)`` with ``rows`` a float32 ``[len(keys), dim]``
        array (rows not found are zero), ``found[i]`` whether entry ``i`` was read and verified, and the
        number of bad entries (counted as not found, like a miss)."""
        rows = np.zeros((len(keys), dim), dtype=np.float32)
        found = [False] * len(keys)
        corrupt = 0
        root = os.fspath(self.root)
        for i, key in enumerate(keys):
            try:
                with open(f"{root}/{key[:2]}/{key}.safetensors", "rb") as fh:  # = self.path(key), faster
                    data = fh.read()
            except FileNotFoundError:
                continue
            except OSError:
                corrupt += 1
                continue
            vec = _decode(data, key, dim)
            if vec is None:
                corrupt += 1
            else:
                rows[i] = vec
                found[i] = True
        return rows, found, corrupt

    def put(self, key: str, vec: torch.Tensor) -> None:
        """Atomically write one vector (temp file in the same directory, then ``os.replace``)."""
        p = self.path(key)
        arr = vec.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(arr.numpy().tobytes()).hexdigest()
        blob = st_save({"z": arr}, metadata={"format": _FORMAT, "key": key, "sha256": digest})
        atomic_write(p, lambda tmp: tmp.write_bytes(blob))


def _decode(data: bytes, key: str, dim: int) -> np.ndarray | None:
    """Parse and verify one entry (a safetensors file holding one float32 vector ``z``): its header names
    this key and the sha256 of the vector's bytes, which must match. None when anything is off."""
    try:
        if len(data) < 8:
            return None
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            return None
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__", {})
        if meta.get("format") != _FORMAT or meta.get("key") != key or set(header) != {"__metadata__", "z"}:
            return None
        z = header["z"]
        begin, end = (int(x) for x in z["data_offsets"])
        if z["dtype"] != "F32" or list(z["shape"]) != [dim] or (begin, end) != (0, 4 * dim):
            return None
        if 8 + n + end != len(data):
            return None
        payload = memoryview(data)[8 + n :]
        if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
            return None
        vec = np.frombuffer(payload, dtype="<f4")
    except Exception:  # any parse failure means a bad entry, never a crash
        return None
    if not bool(np.isfinite(vec).all()):
        return None
    return vec
