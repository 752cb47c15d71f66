"""The one registry of encoder backends, in lm-evaluation-harness's style: a backend class (or factory) is
registered under a prefix with :func:`register_backend`::

    @register_backend("hf-clip", describe=describe_hf_clip)
    class HFClipVision(Encoder): ...

``"<prefix>:<source>"`` then selects it; a name without a registered prefix (a hub id, a local folder) goes to
the default backend of its modality (:data:`DEFAULT_BACKENDS`). Image factories take ``(source, name=...)``,
text ones ``(source, layer, name=...)``. A backend's ``describe`` (same arguments) gives its
:class:`EncoderInfo` from configuration files without loading weights, or None when it cannot tell; a backend
without one is loaded to describe it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import Encoder, EncoderInfo

F = TypeVar("F", bound=Callable[..., Encoder])


@dataclass(frozen=True)
class Backend:
    """One registered backend: how to load it (``factory``) and, optionally, how to describe it without
    loading (``describe``)."""

    modality: str  # "image" or "text"
    prefix: str
    factory: Callable[..., Encoder]
    describe: Callable[..., EncoderInfo | None] | None = None


#: Every registered backend, by ``(modality, prefix)``.
BACKENDS: dict[tuple[str, str], Backend] = {}

#: The backend of a name without a registered prefix (a hub id or local folder).
DEFAULT_BACKENDS: dict[str, str] = {"image": "hf-clip", "text": "hf-text"}


def register_encoder(
    modality: str,
    prefix: str,
    factory: Callable[..., Encoder],
    describe: Callable[..., EncoderInfo | None] | None = None,
) -> None:
    """Add (or replace) a backend, e.g. ``register_encoder("image", "e5v", make_e5v)``; then ``"e5v:<src>"``.

    ``describe`` (optional, same arguments as ``factory``) gives the backend's :class:`EncoderInfo`
    without loading weights, so an :class:`~lmms_emi.embed.Embedder` loads the model only on a cache
    miss; without it the model is loaded when the Embedder is built."""
    if modality not in DEFAULT_BACKENDS:
        raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")
    BACKENDS[(modality, prefix)] = Backend(modality, prefix, factory, describe)


def register_backend(
    prefix: str, *, modality: str | None = None, describe: Callable[..., EncoderInfo | None] | None = None
) -> Callable[[F], F]:
    """Class decorator form of :func:`register_encoder`; the modality defaults to the class's ``modality``."""

    def decorate(factory: F) -> F:
        register_encoder(modality or factory.modality, prefix, factory, describe)  # type: ignore[attr-defined]
        return factory

    return decorate


class _Table(Mapping[str, Callable[..., Any]]):
    """A read-only view of :data:`BACKENDS`: prefix -> factory (or describer) of one modality."""

    def __init__(self, modality: str, field: str) -> None:
        self._modality, self._field = modality, field

    def _entries(self) -> dict[str, Callable[..., Any]]:
        out = {}
        for (modality, prefix), backend in BACKENDS.items():
            fn = getattr(backend, self._field)
            if modality == self._modality and fn is not None:
                out[prefix] = fn
        return out

    def __getitem__(self, prefix: str) -> Callable[..., Any]:
        return self._entries()[prefix]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._entries()!r})"


#: Views of the registry by modality (read-only; register with :func:`register_encoder`).
VISION_ENCODERS: Mapping[str, Callable[..., Encoder]] = _Table("image", "factory")
TEXT_ENCODERS: Mapping[str, Callable[..., Encoder]] = _Table("text", "factory")
VISION_DESCRIBERS: Mapping[str, Callable[..., EncoderInfo | None]] = _Table("image", "describe")
TEXT_DESCRIBERS: Mapping[str, Callable[..., EncoderInfo | None]] = _Table("text", "describe")


def split_encoder_name(spec: str, modality: str) -> tuple[str, str]:
    """``"open_clip:ViT-B-32:openai" -> ("open_clip", "ViT-B-32:openai")``; unprefixed names
    (hub ids, local paths) go to the default backend."""
    prefix, sep, rest = spec.partition(":")
    if (modality, prefix) in BACKENDS and (sep or not os.path.exists(spec)):
        return prefix, rest
    return DEFAULT_BACKENDS[modality], spec


def load_encoder(spec: str | Encoder, modality: str, *, layer: int = 0, name: str | None = None) -> Encoder:
    """Resolve a registry name / hub id / local path (or pass an :class:`Encoder` through)."""
    if isinstance(spec, Encoder):
        if spec.modality != modality:
            raise ValueError(f"{type(spec).__name__} is a {spec.modality} encoder, expected {modality}")
        return spec
    prefix, source = split_encoder_name(str(spec), modality)
    factory = BACKENDS[(modality, prefix)].factory
    if modality == "image":
        return factory(source, name=name)
    return factory(source, layer, name=name)


def describe_encoder(
    spec: str | Encoder, modality: str, *, layer: int = 0, name: str | None = None
) -> EncoderInfo | None:
    """What :func:`load_encoder` with the same arguments would load, from configuration files only (no
    weights read, no model library imported for the Hugging Face backends): an :class:`EncoderInfo`, or
    None when the backend cannot tell without loading. Raises what loading would for a missing encoder
    (:class:`EncoderLoadError`) or a text layer out of range (``ValueError``)."""
    if isinstance(spec, Encoder):
        return load_encoder(spec, modality).info()
    prefix, source = split_encoder_name(str(spec), modality)
    describe = BACKENDS[(modality, prefix)].describe
    if describe is None:
        return None
    if modality == "image":
        return describe(source, name=name)
    return describe(source, layer, name=name)
