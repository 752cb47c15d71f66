"""What every encoder backend shares: the :class:`Encoder` interface, the :class:`EncoderInfo` that
describes an encoder without loading it, a preprocessed batch (:class:`EncoderBatch`), and the pieces of an
encoder's cache identity (fingerprints of its weights)."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lmms_emi.errors import EncoderLoadError


@dataclass
class EncoderBatch:
    """A preprocessed batch: model inputs plus the in-batch indices of truncated texts."""

    inputs: dict[str, torch.Tensor]
    truncated: list[int] = field(default_factory=list)


class Encoder(ABC):
    """One frozen feature extractor for one modality."""

    modality: ClassVar[str]  # "image" or "text"
    backend: ClassVar[str]  # the backend family named in the cache identity
    feature: str
    name: str  # what encoder_spec() records
    layer: int
    dim: int  # raw feature dimension
    fingerprint: str  # identifies the weights (cache key part)

    @abstractmethod
    def prepare(self, items: Sequence[Any]) -> EncoderBatch:
        """CPU preprocessing of one batch; must be thread-safe (runs in worker threads)."""

    @abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw features ``[B, dim]`` for inputs already on the encoder's device."""

    @abstractmethod
    def to(self, device: torch.device) -> Encoder: ...

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "feature": self.feature, "layer": self.layer, "dim": self.dim}

    def cache_id(self) -> str:
        return make_cache_id(self.backend, self.name, self.fingerprint, self.feature, self.layer)

    def info(self) -> EncoderInfo:
        """What this (loaded) encoder is, in the form :func:`describe_encoder` gives without loading."""
        return EncoderInfo(
            modality=self.modality,
            backend=self.backend,
            source="",
            name=self.name,
            feature=self.feature,
            layer=self.layer,
            dim=self.dim,
            cache_id=self.cache_id(),
        )


def make_cache_id(backend: str, name: str, fingerprint: str, feature: str, layer: int) -> str:
    """An encoder's part of the embedding cache key (changing it orphans every cached vector)."""
    return f"{backend}|{name}|{fingerprint}|{feature}|layer={layer}"


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder is, known from its configuration without loading its weights.

    ``name``, ``feature``, ``layer`` and ``dim`` are what ``encoder_spec()`` records; ``cache_id`` is the
    encoder's part of the embedding cache key (it names the weights: a local folder's file sizes and
    times, or the hub id); ``source`` is what the backend loads (hub id, folder, file; "" for an encoder
    passed in already loaded); ``recognised`` is the canonical name of the known encoder a local folder's
    config was recognised as (None otherwise)."""

    modality: str
    backend: str
    source: str
    name: str
    feature: str
    layer: int
    dim: int
    cache_id: str
    recognised: str | None = None

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "feature": self.feature, "layer": self.layer, "dim": self.dim}


def dir_fingerprint(path: str) -> str:
    """Cheap identity of a local model directory: names, sizes and mtimes of its files."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def source_fingerprint(src: str) -> str:
    """Identity of a hub id (the id itself) or local folder (:func:`dir_fingerprint`)."""
    return f"dir:{dir_fingerprint(src)}" if os.path.isdir(src) else f"hub:{src}"


def file_fingerprint(path: str) -> str:
    """Cheap identity of one weights file: its name, size and mtime."""
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def load_or_explain(what: str, src: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, with an ``OSError`` (missing files, no network) turned into one :class:`EncoderLoadError`."""
    try:
        return fn()
    except OSError as exc:
        raise EncoderLoadError(
            f"could not load {what} {src!r}: {exc}\n(no network? pass a local directory saved with "
            "save_pretrained, or use Embedder.from_profile('offline'))"
        ) from exc
