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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
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
        p = self.path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None, False
        except OSError:
            return None, True
        vec = _decode(data, key, dim)
        return (None, True) if vec is None else (vec, False)

    def put(self, key: str, vec: torch.Tensor) -> None:
        """Atomically write one vector (temp file in the same directory, then ``os.replace``)."""
        p = self.path(key)
        arr = vec.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(arr.numpy().tobytes()).hexdigest()
        blob = st_save({"z": arr}, metadata={"format": _FORMAT, "key": key, "sha256": digest})
        atomic_write(p, lambda tmp: tmp.write_bytes(blob))


def _decode(data: bytes, key: str, dim: int) -> torch.Tensor | None:
    """Parse and verify one entry; None when anything is off."""
    try:
        if len(data) < 8:
            return None
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            return None
        meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            return None
        z = st_load(data)["z"]
    except Exception:  # any parse failure means a bad entry, never a crash
        return None
    if z.dtype != torch.float32 or z.ndim != 1 or z.shape[0] != dim:
        return None
    if hashlib.sha256(z.numpy().tobytes()).hexdigest() != meta.get("sha256"):
        return None
    if not bool(np.isfinite(z.numpy()).all()):
        return None
    return z.clone()
