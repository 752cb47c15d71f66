"""``hf-text`` (the default text backend, e.g. ``xlm-roberta-base``): an encoder-only Hugging Face text model.

Feature ``mean_after_first`` of hidden layer ``l``: ``z_t = sum_{i>=1} m_i h_i^{(l)} / sum_{i>=1} m_i`` with
``m`` the attention mask (mean over the non-padding tokens after the first; the final ``</s>`` counts).  For
``l = 0`` only ``model.embeddings`` runs (word + position + type embeddings, LayerNorm), which equals
``hidden_states[0]`` of the full forward.

A text longer than :data:`CHARS_PER_TOKEN` × the encoder's max length is cut at a word boundary before it
is tokenized (:func:`word_prefix`), so memory is bounded by the encoder, not by the input (a tokenizer
encodes the whole text before truncating it: a 100 MB response took 14 GB); the tokens the encoder sees,
and so the embedding, are those of the whole text (see ``HFText._cut``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from lmms_emi.errors import EncoderLoadError

from .base import Encoder, EncoderBatch, EncoderInfo, load_or_explain, make_cache_id, source_fingerprint
from .known import identity, read_json, recorded_name
from .registry import register_backend

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
#: Characters kept of a long text per token of the encoder's max length (before the word-boundary cut): a
#: safe margin over the few characters per token of real text (about 4-6 in English; a vocabulary piece is
#: rarely over 16), so the cut text still has more tokens than the encoder keeps. Correctness does not rest
#: on it: a cut text with too few tokens is not used (``HFText._cut``).
CHARS_PER_TOKEN = 64


def word_prefix(text: str, max_chars: int) -> str | None:
    """The longest prefix ``text[:k]``, k ≤ ``max_chars``, that ends a word: ``text[k]`` is a space and
    ``text[k-1]`` is not whitespace. None when ``text`` is not longer than ``max_chars`` or has no such k.

    >>> word_prefix("one two  three", 9), word_prefix("one two  three", 6), word_prefix("one", 2)
    ('one two', 'one', None)
    """
    if len(text) <= max_chars:
        return None
    k = text.rfind(" ", 1, max_chars + 1)
    while k > 0 and text[k - 1].isspace():
        k = text.rfind(" ", 1, k)
    return text[:k] if k > 0 else None


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


def describe_hf_text(
    source: str, layer: int = 0, *, name: str | None = None, max_length: int = 512
) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`HFText` from ``config.json`` and ``tokenizer_config.json``; None when
    the config does not tell (then the model is loaded to find out)."""
    config = read_json(source, "config.json", "text model", required=True)
    assert config is not None
    model_type = config.get("model_type")
    n_layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    if not isinstance(n_layers, int) or not isinstance(hidden, int):
        return None
    if model_type not in _ROBERTA_POSITIONS and model_type not in _ABSOLUTE_POSITIONS:
        return None
    resolved = _resolve_layer(layer, n_layers, source)
    tokenizer = read_json(source, "tokenizer_config.json", "tokenizer", required=False) or {}
    limit = _text_max_length(
        max_length,
        tokenizer.get("model_max_length"),
        config.get("max_position_embeddings"),
        config.get("pad_token_id"),
        model_type in _ROBERTA_POSITIONS,
    )
    recorded, known = identity(source, "hf-text", name, config, tokenizer=tokenizer)
    fp = f"{source_fingerprint(source)}|maxlen={limit}"
    return EncoderInfo(
        "text", "hf-text", source, recorded, "mean_after_first", resolved, hidden,
        make_cache_id("hf-text", recorded, fp, "mean_after_first", resolved), known,
    )  # fmt: skip


def _resolve_layer(layer: int, n_layers: int, source: str) -> int:
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= n_layers:
        raise ValueError(f"text layer {layer} out of range for {source!r} ({n_layers} layers, 0..{n_layers})")
    return resolved


def mean_after_first(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``z = sum_{i>=1} m_i h_i / sum_{i>=1} m_i``; a row with no token after the first falls back
    to ``h_0`` (never NaN)."""
    m = attention_mask[:, 1:].unsqueeze(-1).to(h.dtype)
    s = (h[:, 1:, :] * m).sum(dim=1)
    c = m.sum(dim=1)
    return torch.where(c > 0, s / c.clamp_min(1.0), h[:, 0, :])


@register_backend("hf-text", describe=describe_hf_text)
class HFText(Encoder):
    """Hugging Face encoder-only text model (XLM-R, BERT, ...); feature = mean over the non-padding
    tokens after the first of hidden layer ``layer`` (0 = embedding output, run alone)."""

    modality = "text"
    backend = "hf-text"

    def __init__(
        self, source: str, layer: int = 0, *, name: str | None = None, max_length: int = 512
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = load_or_explain("tokenizer", source, lambda: AutoTokenizer.from_pretrained(source))
        self.model = load_or_explain("text model", source, lambda: AutoModel.from_pretrained(source)).eval()
        if self.tokenizer.pad_token is None:
            raise EncoderLoadError(f"tokenizer of {source!r} has no padding token")
        self.layer = _resolve_layer(layer, int(self.model.config.num_hidden_layers), source)
        self.name = recorded_name(source, self.backend, name)
        self.feature = "mean_after_first"
        self.dim = int(self.model.config.hidden_size)
        self.max_length = self._max_length(max_length)
        self.fingerprint = f"{source_fingerprint(source)}|maxlen={self.max_length}"
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

    def prepare(self, items: Sequence[str]) -> EncoderBatch:
        texts = list(items)
        with self._lock:
            return self._prepare_locked(texts)

    def _cut(self, text: str) -> str | None:
        """``text`` cut before tokenization (None: use it whole), so that tokenizing does not cost memory in
        proportion to a huge input, and the encoder still sees exactly the tokens of the whole text.

        The cut is :func:`word_prefix` at :data:`CHARS_PER_TOKEN` × ``max_length`` characters: it ends at a
        non-space character followed by a space. Every tokenizer of these models splits words at spaces
        before its subword model runs, and that split, the normalizers (NFKC-style maps, lower-casing,
        accent stripping, collapsing runs of spaces) and the subword model act on each word alone (WordPiece
        and BERT's pre-tokenizer; SentencePiece / Metaspace; byte-level BPE, whose pattern ends a letter,
        digit or punctuation run before a space). So the tokens of the prefix are the first tokens of the
        whole text, word for word, and when the prefix has more tokens than ``max_length`` (checked here,
        on a text of bounded size), truncation keeps the same first ``max_length`` tokens of both: the
        same ids, mask and embedding, bit for bit. Otherwise (no space to cut at, or too few tokens in the
        prefix: e.g. megabytes of whitespace) the whole text is used, as before."""
        prefix = word_prefix(text, CHARS_PER_TOKEN * self.max_length)
        if prefix is None:
            return None
        return prefix if self._n_tokens(prefix) > self.max_length else None

    def _n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    def _prepare_locked(self, texts: list[str]) -> EncoderBatch:
        cuts = [self._cut(t) for t in texts]
        enc = self.tokenizer(
            [t if c is None else c for t, c in zip(texts, cuts, strict=True)],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        truncated = [
            i
            for i, n in enumerate(lengths)
            if cuts[i] is not None or (n >= self.max_length and self._n_tokens(texts[i]) > self.max_length)
        ]  # a cut text has more tokens than the encoder keeps
        return EncoderBatch(inputs, truncated)

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
