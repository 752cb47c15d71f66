"""Builders of tiny random-weight encoders for the embedding tests and benchmark (all offline).

The models are real transformers classes (``CLIPVisionModel``, ``CLIPModel``, ``XLMRobertaModel``)
built from small configs, saved with ``save_pretrained`` and meant to be loaded back by path
through :mod:`lmms_emi.embed`'s real loading code.  The tokenizer is a real
``XLMRobertaTokenizer`` (Unigram, SentencePiece-style "▁" pieces) whose vocabulary is built here
instead of downloaded: special tokens at XLM-R's ids (<s>=0, <pad>=1, </s>=2, <unk>=3).
"""

from __future__ import annotations

import io
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = (
    "a an the of and to in is are was on for with as at by it this that from be or not image picture "
    "photo question answer what which who where when how why many much color colour red green blue "
    "yellow black white dog puppy cat kitten bird car bus street park grass tree sky man woman person "
    "people child holding sitting standing running runs playing on left right top bottom side there "
    "describe detail details scene shows show look looks like one two three four five number text sign "
    "cup coffee rocket astronaut space camera coins table food plate water quarterly tax filing deadline"
).split()


def xlmr_vocab() -> list[tuple[str, float]]:
    """Unigram vocabulary: XLM-R specials, then word pieces and single characters (full coverage)."""
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    pieces: dict[str, float] = {}
    for w in WORDS:
        pieces.setdefault("▁" + w, -4.0 - 0.1 * len(w))
    chars = string.ascii_letters + string.digits + string.punctuation
    for c in chars:
        pieces.setdefault(c, -9.0)
        pieces.setdefault("▁" + c, -9.5)
    pieces.setdefault("▁", -10.0)
    return specials + sorted(pieces.items())


def save_tiny_xlmr(
    path: Path, *, hidden: int = 32, layers: int = 2, max_positions: int = 66, seed: int = 0
) -> Path:
    """Tiny random ``XLMRobertaModel`` + ``XLMRobertaTokenizer`` at ``path`` (max length 64 tokens)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    tok = XLMRobertaTokenizer(vocab=xlmr_vocab(), model_max_length=512)
    cfg = XLMRobertaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = XLMRobertaModel(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_xlmr_base_arch(path: Path, seed: int = 0) -> Path:
    """Full-size XLM-R-base architecture (the hub config of ``xlm-roberta-base``: 250k vocab, 12 layers,
    LayerNorm eps 1e-5), random weights; the tokenizer is the small one of :func:`xlmr_vocab`."""
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    tok = XLMRobertaTokenizer(vocab=xlmr_vocab(), model_max_length=512)
    cfg = XLMRobertaConfig(
        vocab_size=250002,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    XLMRobertaModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _clip_processor(image_size: int):  # type: ignore[no-untyped-def]
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def save_tiny_clip_vision(path: Path, *, hidden: int = 32, image_size: int = 32, seed: int = 0) -> Path:
    """Tiny random ``CLIPVisionModel`` (patch 8 -> 16 patches + class token) and its processor."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPVisionModel(cfg).eval().save_pretrained(path)
    _clip_processor(image_size).save_pretrained(path)
    return path


def tiny_encoder_flags(vision: Path, text: Path) -> list[str]:
    """The score / analyze / eval flags that select a tiny CLIP vision folder and a tiny XLM-R folder (the
    embedding layer, as the paper's features)."""
    return ["--vision-encoder", f"hf-clip:{vision}", "--text-encoder", f"hf-text:{text}", "--text-layer", "0"]


def save_tiny_clip_full(path: Path, *, hidden: int = 32, image_size: int = 32, seed: int = 1) -> Path:
    """Tiny random full ``CLIPModel`` (text + vision towers): the vision tower is read from it."""
    from transformers import CLIPConfig, CLIPModel

    v = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
    }
    t = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=t, vision_config=v, projection_dim=16)).eval().save_pretrained(path)
    _clip_processor(image_size).save_pretrained(path)
    return path


def save_clip_b32_arch(path: Path, seed: int = 0) -> Path:
    """Full-size CLIP ViT-B/32 vision architecture (default ``CLIPVisionConfig``), random weights."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(patch_size=32)).save_pretrained(path)
    CLIPImageProcessor().save_pretrained(path)
    return path


def photos() -> dict[str, np.ndarray]:
    """Real photos shipped inside scikit-image (camera is greyscale)."""
    from skimage import data

    return {k: getattr(data, k)() for k in ("astronaut", "chelsea", "coffee", "rocket", "camera")}


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
