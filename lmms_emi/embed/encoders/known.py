"""Configuration files read without loading any model, and the encoders recognised from them.

A local folder whose config is that of a known encoder (:data:`KNOWN_ENCODERS`: the paper's CLIP ViT-B/32 and
XLM-R-base) is recorded under that encoder's canonical name, so local copies of the paper's encoders work with
the paper's estimator; an explicit ``name=`` always wins (:func:`recorded_name`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmms_emi.errors import EncoderLoadError


def read_json(source: str, filename: str, what: str, *, required: bool) -> dict[str, Any] | None:
    """``filename`` of a local model folder or hub repository (through the hub cache), as a dict.

    A missing optional file gives None; a missing required file, an unreachable hub or a bad file raises
    :class:`EncoderLoadError` (the message starts ``could not load <what> '<source>'``)."""
    if os.path.isdir(source):
        path: str | None = os.path.join(source, filename)
        if not os.path.isfile(path):  # type: ignore[arg-type]
            if not required:
                return None
            raise EncoderLoadError(f"could not load {what} {source!r}: the folder has no {filename}")
    else:
        path = _hub_file(source, filename, what, required=required)
        if path is None:
            return None
    try:
        with open(path, encoding="utf-8") as fh:  # type: ignore[arg-type]
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EncoderLoadError(f"could not load {what} {source!r}: {filename} is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise EncoderLoadError(f"could not load {what} {source!r}: {filename} is not a JSON object")
    return data


def _hub_file(source: str, filename: str, what: str, *, required: bool) -> str | None:
    """Local path of one file of a hub repository (from the hub cache, downloaded when needed); None when an
    optional file cannot be had."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise EncoderLoadError(f"could not load {what} {source!r}: huggingface_hub is missing") from exc
    try:
        return str(hf_hub_download(source, filename))
    except Exception as exc:  # offline and not cached, unknown repository, invalid id, missing file, ...
        if not required:
            return None
        if isinstance(exc, RemoteEntryNotFoundError):
            missing = f"could not load {what} {source!r}: the repository has no {filename}"
            raise EncoderLoadError(missing) from None
        raise EncoderLoadError(
            f"could not load {what} {source!r}: {exc}\n(no network? pass a local directory saved with "
            "save_pretrained, or use Embedder.from_profile('offline'))"
        ) from exc


def vision_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The vision part of a CLIP config: ``vision_config`` of a ``CLIPModel``, else the config itself."""
    nested = config.get("vision_config")
    return nested if isinstance(nested, Mapping) else config


@dataclass(frozen=True)
class KnownEncoder:
    """An encoder recognised by its configuration: a local folder whose config has these values is recorded
    under ``name``.

    ``config``: required values of ``config.json`` (of its vision part for CLIP); a key the file lacks takes
    the library's default from ``defaults``. ``processor``: the same for ``preprocessor_config.json``.
    ``aliases``: other hub ids of the same weights. The weights themselves are not hashed: a folder with
    this architecture whose ``_name_or_path`` names no other hub model is taken to be this encoder (pass
    ``name=`` to record something else)."""

    name: str
    backend: str
    model_types: tuple[str, ...]
    config: Mapping[str, Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    processor: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def ids(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


_CLIP_B32 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 32,
    "image_size": 224,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
_CLIP_PROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}

#: Encoders recognised from a local folder's configuration (the paper's two).
KNOWN_ENCODERS: tuple[KnownEncoder, ...] = (
    KnownEncoder(
        name="openai/clip-vit-base-patch32",
        backend="hf-clip",
        model_types=("clip_vision_model", "clip"),
        config=_CLIP_B32,
        defaults=_CLIP_B32,  # transformers' CLIPVisionConfig defaults are ViT-B/32
        processor=_CLIP_PROCESSOR,
    ),
    KnownEncoder(
        name="xlm-roberta-base",
        backend="hf-text",
        model_types=("xlm-roberta",),
        config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "vocab_size": 250002,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "pad_token_id": 1,
            "position_embedding_type": "absolute",
        },
        defaults={  # transformers' XLMRobertaConfig defaults
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "vocab_size": 30522,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "pad_token_id": 1,
            "position_embedding_type": "absolute",
        },
        aliases=("FacebookAI/xlm-roberta-base",),
    ),
)


def canonical_name(name: str) -> str:
    """The canonical name of a known encoder's hub id or alias (e.g. ``FacebookAI/xlm-roberta-base`` ->
    ``xlm-roberta-base``); any other name unchanged."""
    for known in KNOWN_ENCODERS:
        if name in known.ids():
            return known.name
    return name


def _same(want: Any, got: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        try:
            return math.isclose(float(want), float(got), rel_tol=1e-6, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    if isinstance(want, list | tuple) and isinstance(got, list | tuple):
        return len(want) == len(got) and all(_same(a, b) for a, b in zip(want, got, strict=True))
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        return set(want) == set(got) and all(_same(want[k], got[k]) for k in want)
    return bool(want == got)


def _processor_values(proc: Mapping[str, Any]) -> dict[str, Any]:
    """Old single-int ``size`` / ``crop_size`` spellings in the dict form the library uses now."""
    out = dict(proc)
    if isinstance(out.get("size"), int):
        out["size"] = {"shortest_edge": out["size"]}
    if isinstance(out.get("crop_size"), int):
        out["crop_size"] = {"height": out["crop_size"], "width": out["crop_size"]}
    return out


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _names_other_model(name_or_path: Any, known: KnownEncoder) -> bool:
    """Whether a config's ``_name_or_path`` names a hub model other than ``known`` (a local path, an
    empty value or one of ``known``'s ids does not)."""
    if not isinstance(name_or_path, str) or not name_or_path or name_or_path in known.ids():
        return False
    if name_or_path.startswith(("/", ".", "~")) or os.path.exists(name_or_path):
        return False
    return bool(_HUB_ID.match(name_or_path))


def recognise(
    backend: str,
    config: Mapping[str, Any],
    processor: Mapping[str, Any] | None = None,
    tokenizer: Mapping[str, Any] | None = None,
) -> str | None:
    """The canonical name of the :data:`KNOWN_ENCODERS` entry a model folder's config files describe, or
    None. ``config``: ``config.json``; ``processor``: ``preprocessor_config.json`` (images);
    ``tokenizer``: ``tokenizer_config.json`` (texts)."""
    for known in KNOWN_ENCODERS:
        if known.backend != backend or config.get("model_type") not in known.model_types:
            continue
        body = vision_config(config) if backend == "hf-clip" else config
        if any(not _same(want, body.get(k, known.defaults.get(k))) for k, want in known.config.items()):
            continue
        if _names_other_model(config.get("_name_or_path"), known):
            continue
        if known.processor:
            got = _processor_values(processor or {})
            if any(not _same(want, got.get(k, want)) for k, want in known.processor.items()):
                continue
        tok_class = (tokenizer or {}).get("tokenizer_class")
        if backend == "hf-text" and tok_class and not str(tok_class).startswith("XLMRoberta"):
            continue
        return known.name
    return None


def identity(source: str, backend: str, name: str | None, config: Mapping[str, Any], **files: Any) -> tuple:
    """(recorded name, recognised canonical name or None) of a hub id or local folder, from its config files
    already read (``files``: ``processor=`` or ``tokenizer=``, as :func:`recognise` takes them)."""
    if name is not None:
        return canonical_name(name), None
    if not os.path.isdir(source):
        return canonical_name(source), None  # a hub id names itself
    known = recognise(backend, config, **files)
    return (known or source), known


def recorded_name(source: str, backend: str, name: str | None) -> str:
    """The name an encoder loaded from ``source`` records: the rule of :func:`identity`, reading the config
    files itself (what a backend uses when it loads without being described first)."""
    if name is not None or not os.path.isdir(source):
        return canonical_name(name if name is not None else source)
    config = read_json(source, "config.json", "model config", required=False) or {}
    if backend == "hf-clip":
        files = {"processor": read_json(source, "preprocessor_config.json", "processor", required=False)}
    else:
        files = {"tokenizer": read_json(source, "tokenizer_config.json", "tokenizer", required=False)}
    return recognise(backend, config, **files) or source
