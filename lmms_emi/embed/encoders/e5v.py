"""E5-V embeddings (Jiang et al. 2024, "E5-V: Universal Embeddings with Multimodal Large Language Models";
weights ``royokong/e5-v``, a LLaVA-NeXT-8B) through transformers' LLaVA-NeXT classes.

An E5-V embedding is the last token's hidden state of the language model's last layer under a prompt that
asks for a one-word summary, wrapped in the model's llama-3 chat layout (:data:`LLAMA3_TEMPLATE`)::

    text   ->  "<sent>\\nSummary above sentence in one word: "      (:data:`TEXT_PROMPT`)
    image  ->  "<image>\\nSummary above image in one word: "        (:data:`IMAGE_PROMPT`)
    joint  ->  mean over the prompts of :data:`JOINT_PROMPTS` (image and question together) of the
               L2-normalised last-token states

Three backends, one per feature, all of them loading any local LLaVA-NeXT folder or hub id (default
``royokong/e5-v``) and sharing one loaded model when they name the same source:

* ``e5v`` (text): feature ``e5v_text``; the Embedder embeds questions, responses and references with it;
* ``e5v`` (image): feature ``e5v_image``; the "disjoint" query z_x = (z_v + z_t) / 2 (paper appendix C.2);
* ``e5v-joint`` (image): feature ``e5v_joint``; a *joint-query* encoder (:data:`JOINT_QUERY_FEATURES`): it
  embeds (image, question) pairs, and the Embedder records that one vector as both z_v and z_t, so
  z_x = (z_v + z_t) / 2 is the joint embedding itself.

Rows are batch-invariant: sequences are padded on the right and the state of each row's last real token is
taken (a causal model's last real token never attends to the padding after it). A text longer than
``max_text_tokens`` tokens is cut to that many tokens *before* it is put into the prompt, so the prompt's
end, whose last token is the embedding, is always kept. A literal ``<image>`` inside a text is written
``<image >`` so that it cannot claim an image.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lmms_emi.errors import EncoderLoadError

from .base import Encoder, EncoderBatch, EncoderInfo, load_or_explain, make_cache_id, source_fingerprint
from .known import canonical_name, read_json
from .registry import register_backend

E5V_DEFAULT = "royokong/e5-v"
#: The E5-V model card's llama-3 chat layout around a prompt (its code's ``llama3_template``).
LLAMA3_TEMPLATE = (
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n \n"
)
#: E5-V's text and image prompts (model card and paper); ``<sent>`` is replaced by the text.
TEXT_PROMPT = "<sent>\nSummary above sentence in one word: "
IMAGE_PROMPT = "<image>\nSummary above image in one word: "
#: Joint prompts for an image with its question (``<sent>``). WRITTEN FOR LMMS-EMI, NOT QUOTED: Oh et al.
#: (ICML 2025) appendix C.2 averages four joint image-and-question prompts whose exact wording was not
#: available here; these four follow E5-V's "in one word" pattern (its composed-retrieval prompt puts the
#: image first and the text after it). Check them against the paper before comparing with its Table 4.
JOINT_PROMPTS: tuple[str, ...] = (
    "<image>\n<sent>\nSummary above image and question in one word: ",
    "<image>\nQuestion: <sent>\nSummary above image and question in one word: ",
    "<image>\n<sent>\nSummary above image and sentence in one word: ",
    "<image>\n<sent>\nDescribe the image and the question in one word: ",
)
IMAGE_TOKEN = "<image>"
#: Tokens of a text kept inside the prompt (Llama-3's context is 8192; LLaVA-NeXT's image takes ~2900).
MAX_TEXT_TOKENS = 1024
#: Features of joint-query image encoders: their items are (image, question) pairs, see the module docstring.
JOINT_QUERY_FEATURES = frozenset({"e5v_joint"})
# Llama's defaults, which transformers fills in for a text_config that leaves them out (E5-V's does).
_TEXT_DEFAULTS: dict[str, dict[str, int]] = {"llama": {"hidden_size": 4096, "num_hidden_layers": 32}}


@dataclass(frozen=True)
class JointQueryItem:
    """One item for a joint-query encoder: an image item (anything with ``load_rgb()``) and its question;
    ``load_rgb()`` gives the (RGB image, question) pair the encoder's ``prepare`` takes."""

    image: Any
    question: str

    def load_rgb(self) -> tuple[Image.Image, str]:
        return self.image.load_rgb(), self.question

    def __getitem__(self, key: Any) -> str:  # where a truncated item is quoted, its question is
        return self.question[key]


def is_joint_query(info: EncoderInfo) -> bool:
    """Whether an image encoder embeds (image, question) pairs rather than images."""
    return info.modality == "image" and info.feature in JOINT_QUERY_FEATURES


def fill_prompts(prompts: Sequence[str], text: str) -> list[str]:
    """Each prompt with ``<sent>`` replaced by ``text``, wrapped in :data:`LLAMA3_TEMPLATE`.

    >>> fill_prompts([TEXT_PROMPT], "a cat")[0].split("\\n\\n")[1]
    'a cat\\nSummary above sentence in one word: <|eot_id|><|start_header_id|>assistant<|end_header_id|>'
    """
    return [LLAMA3_TEMPLATE.format(p.replace("<sent>", text)) for p in prompts]


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``z_b = H[b, L_b − 1]`` with ``L_b = Σ_i m_bi`` the length of right-padded row ``b``: ``[B, d]``.

    >>> h = torch.arange(12.0).reshape(2, 3, 2); m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    >>> last_token_states(h, m).tolist()
    [[2.0, 3.0], [10.0, 11.0]]
    """
    last = attention_mask.long().sum(dim=1).clamp_min(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def mean_of_prompts(z: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """``z̄_i = (1/K) Σ_k z_ik / ||z_ik||``, ``K = n_prompts``, for rows laid out prompt-major (row
    ``k·B + i``): ``[B, d]`` (the Embedder L2-normalises the mean).

    >>> mean_of_prompts(torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 5.0], [1.0, 0.0]]), 2)
    tensor([[0.3000, 0.9000],
            [0.5000, 0.5000]])
    """
    unit = torch.nn.functional.normalize(z.float(), dim=-1)
    return unit.reshape(n_prompts, -1, z.shape[-1]).mean(dim=0)


def _prompts_hash(*prompts: str) -> str:
    return hashlib.sha256("\x00".join((LLAMA3_TEMPLATE, *prompts)).encode()).hexdigest()[:12]


_FEATURE_PROMPTS: dict[str, tuple[str, ...]] = {
    "e5v_text": (TEXT_PROMPT,),
    "e5v_image": (IMAGE_PROMPT,),
    "e5v_joint": JOINT_PROMPTS,
}


def _source(source: str) -> str:
    return source or E5V_DEFAULT


def _text_sizes(config: dict[str, Any], source: str) -> tuple[int, int] | None:
    """(hidden size, number of layers) of the language model of a LLaVA-NeXT config."""
    if config.get("model_type") != "llava_next":
        raise EncoderLoadError(
            f"could not load E5-V model {source!r}: its config.json is a {config.get('model_type')!r} model, "
            "not a LLaVA-NeXT ('llava_next') one"
        )
    text = config.get("text_config") or {}
    defaults = _TEXT_DEFAULTS.get(text.get("model_type", "llama"), {})
    hidden = text.get("hidden_size", defaults.get("hidden_size"))
    layers = text.get("num_hidden_layers", defaults.get("num_hidden_layers"))
    if not isinstance(hidden, int) or not isinstance(layers, int):
        return None
    return hidden, layers


def _resolve_layer(layer: int, n_layers: int, source: str) -> int:
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= n_layers:
        raise ValueError(f"E5-V layer {layer} out of range for {source!r} ({n_layers} layers, 0..{n_layers})")
    return resolved


def _fingerprint(source: str, feature: str, max_text_tokens: int) -> str:
    """The weights (:func:`source_fingerprint`), the prompts and the text limit: a change of any orphans the
    cached vectors."""
    prompts = _prompts_hash(*_FEATURE_PROMPTS[feature])
    return f"{source_fingerprint(source)}|prompts={prompts}|maxtok={max_text_tokens}"


def _info(modality: str, backend: str, feature: str, source: str, name: str | None, layer: int, dim: int,
          max_text_tokens: int) -> EncoderInfo:  # fmt: skip
    recorded = canonical_name(name) if name is not None else source
    fp = _fingerprint(source, feature, max_text_tokens)
    return EncoderInfo(
        modality, backend, source, recorded, feature, layer, dim,
        make_cache_id(backend, recorded, fp, feature, layer), None,
    )  # fmt: skip


def _describe(modality: str, backend: str, feature: str, source: str, layer: int, name: str | None,
              max_text_tokens: int) -> EncoderInfo | None:  # fmt: skip
    source = _source(source)
    config = read_json(source, "config.json", "E5-V model", required=True)
    assert config is not None
    sizes = _text_sizes(config, source)
    if sizes is None:
        return None
    hidden, n_layers = sizes
    return _info(modality, backend, feature, source, name, _resolve_layer(layer, n_layers, source), hidden,
                 max_text_tokens)  # fmt: skip


def describe_e5v_text(
    source: str = "", layer: int = -1, *, name: str | None = None, max_text_tokens: int = MAX_TEXT_TOKENS
) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`E5VText` from ``config.json`` (no weights read)."""
    return _describe("text", "e5v", "e5v_text", source, layer, name, max_text_tokens)


def describe_e5v_image(
    source: str = "", *, name: str | None = None, max_text_tokens: int = MAX_TEXT_TOKENS
) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`E5VImage` from ``config.json`` (no weights read)."""
    return _describe("image", "e5v", "e5v_image", source, -1, name, max_text_tokens)


def describe_e5v_joint(
    source: str = "", *, name: str | None = None, max_text_tokens: int = MAX_TEXT_TOKENS
) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`E5VJoint` from ``config.json`` (no weights read)."""
    return _describe("image", "e5v-joint", "e5v_joint", source, -1, name, max_text_tokens)


class _Loaded:
    """One loaded E5-V model and its processor (shared by the encoders that name the same source)."""

    def __init__(self, source: str) -> None:
        from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

        self.processor = load_or_explain(
            "E5-V processor", source, lambda: LlavaNextProcessor.from_pretrained(source)
        )
        load = LlavaNextForConditionalGeneration.from_pretrained
        self.model = load_or_explain("E5-V model", source, lambda: load(source, dtype="auto")).eval()
        if getattr(self.processor, "patch_size", None) is None:
            # older saves (royokong/e5-v's) leave it out; the processor cannot count image tokens without it.
            # With no select strategy and no extra tokens the count is then the model's (CLS dropped).
            self.processor.patch_size = int(self.model.config.vision_config.patch_size)
        self.processor.tokenizer.padding_side = "right"  # see last_token_states
        if self.processor.tokenizer.pad_token is None:
            self.processor.tokenizer.pad_token = self.processor.tokenizer.eos_token
        self.lock = threading.Lock()  # a fast tokenizer's padding state is per object


_SHARED: weakref.WeakValueDictionary[str, _Loaded] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _load_shared(source: str) -> _Loaded:
    """The loaded model of ``source``: one copy while any encoder holds it (two encoders, one 8B model)."""
    key = f"{source}|{source_fingerprint(source)}"
    with _SHARED_LOCK:
        loaded = _SHARED.get(key)
        if loaded is None:
            loaded = _Loaded(source)
            _SHARED[key] = loaded
        return loaded


class _E5V(Encoder):
    """The part of the three E5-V encoders they share: loading, the prompt batch, the last-token state."""

    feature: str

    def __init__(self, source: str, layer: int, name: str | None, max_text_tokens: int) -> None:
        source = _source(source)
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, not {max_text_tokens}")
        self._shared = _load_shared(source)
        config = self._shared.model.config
        self.dim = int(config.text_config.hidden_size)
        self.layer = _resolve_layer(layer, int(config.text_config.num_hidden_layers), source)
        self.max_text_tokens = max_text_tokens
        self.name = canonical_name(name) if name is not None else source
        self.fingerprint = _fingerprint(source, self.feature, max_text_tokens)

    @property
    def model(self) -> Any:
        return self._shared.model

    @property
    def processor(self) -> Any:
        return self._shared.processor

    def _clean(self, text: str) -> tuple[str, bool]:
        """``text`` with ``<image>`` defused and cut to ``max_text_tokens`` tokens; whether it was cut."""
        text = text.replace(IMAGE_TOKEN, "<image >")
        tok = self.processor.tokenizer
        ids = tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        if len(ids) <= self.max_text_tokens:
            return text, False
        return tok.decode(ids[: self.max_text_tokens]), True

    def _batch(self, prompts: list[str], images: list[Image.Image] | None) -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if images is not None:
            kwargs["images"] = images
        enc = self.processor(**kwargs)
        keep = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
        return {k: v for k, v in enc.items() if k in keep}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        base = getattr(self.model, "model", self.model)  # the LLaVA-NeXT body, without the LM head
        last = self.layer == int(self.model.config.text_config.num_hidden_layers)
        if "pixel_values" in inputs:  # the vision tower's dtype (fp16 weights without autocast)
            inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(self.model.dtype)}
        out = base(**inputs, output_hidden_states=not last, return_dict=True)
        hidden = out.last_hidden_state if last else out.hidden_states[self.layer]
        return self._combine(last_token_states(hidden, inputs["attention_mask"]))

    def _combine(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def to(self, device: torch.device) -> _E5V:
        model = self.model
        if torch.device(device).type == "cpu" and model.dtype in (torch.float16, torch.bfloat16):
            model.float()  # half-precision matmuls on the CPU: slow or missing
        model.to(device)
        return self


@register_backend("e5v", describe=describe_e5v_text)
class E5VText(_E5V):
    """E5-V text embedding: last-token state under :data:`TEXT_PROMPT` (questions, responses, references)."""

    modality = "text"
    backend = "e5v"
    feature = "e5v_text"

    def __init__(
        self, source: str = "", layer: int = -1, *, name: str | None = None,
        max_text_tokens: int = MAX_TEXT_TOKENS,
    ) -> None:  # fmt: skip
        super().__init__(source, layer, name, max_text_tokens)

    def prepare(self, items: Sequence[str]) -> EncoderBatch:
        with self._shared.lock:
            cleaned = [self._clean(str(t)) for t in items]
            prompts = [fill_prompts([TEXT_PROMPT], text)[0] for text, _ in cleaned]
            return EncoderBatch(self._batch(prompts, None), [i for i, (_, cut) in enumerate(cleaned) if cut])


@register_backend("e5v", describe=describe_e5v_image)
class E5VImage(_E5V):
    """E5-V image embedding: last-token state under :data:`IMAGE_PROMPT` (the "disjoint" image query)."""

    modality = "image"
    backend = "e5v"
    feature = "e5v_image"

    def __init__(self, source: str = "", *, name: str | None = None, max_text_tokens: int = MAX_TEXT_TOKENS):
        super().__init__(source, -1, name, max_text_tokens)

    def prepare(self, items: Sequence[Image.Image]) -> EncoderBatch:
        images = list(items)
        if any(not isinstance(im, Image.Image) for im in images):
            raise TypeError("the E5-V image encoder embeds images; (image, question) pairs need 'e5v-joint'")
        with self._shared.lock:
            return EncoderBatch(self._batch(fill_prompts([IMAGE_PROMPT], "") * len(images), images))


@register_backend("e5v-joint", describe=describe_e5v_joint)
class E5VJoint(_E5V):
    """E5-V joint query embedding of an image and its question: the mean of the normalised last-token
    states under the prompts of :data:`JOINT_PROMPTS` (:func:`mean_of_prompts`). Items are (image,
    question) pairs (:class:`JointQueryItem`)."""

    modality = "image"
    backend = "e5v-joint"
    feature = "e5v_joint"

    def __init__(self, source: str = "", *, name: str | None = None, max_text_tokens: int = MAX_TEXT_TOKENS):
        super().__init__(source, -1, name, max_text_tokens)

    def prepare(self, items: Sequence[tuple[Image.Image, str]]) -> EncoderBatch:
        pairs = list(items)
        if any(not isinstance(p, tuple) or len(p) != 2 for p in pairs):
            raise TypeError("the E5-V joint encoder embeds (image, question) pairs (Embedder.embed_queries)")
        with self._shared.lock:
            cleaned = [self._clean(str(q)) for _, q in pairs]
            # prompt-major: row k·B + i is prompt k of pair i (mean_of_prompts undoes it)
            prompts = [fill_prompts([p], text)[0] for p in JOINT_PROMPTS for text, _ in cleaned]
            images = [im for _ in JOINT_PROMPTS for im, _ in pairs]
            truncated = [i for i, (_, cut) in enumerate(cleaned) if cut]
            return EncoderBatch(self._batch(prompts, images), truncated)

    def _combine(self, z: torch.Tensor) -> torch.Tensor:
        return mean_of_prompts(z, len(JOINT_PROMPTS))
