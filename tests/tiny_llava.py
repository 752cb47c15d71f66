"""Tiny random-weight LLaVA-1.5 and LLaVA-NeXT checkpoints, built on the spot and saved with
``save_pretrained`` into a local folder that lmms-eval's ``llava_hf`` model class loads through
``AutoConfig`` / ``AutoProcessor`` (no model hub).

Each folder holds the model's config and safetensors weights, a byte-level BPE tokenizer trained with the
``tokenizers`` package on a small corpus (``<image>`` is a special token; a Vicuna-style chat template), an
image processor (``CLIPImageProcessor`` / ``LlavaNextImageProcessor``) with small sizes, and the
``LlavaProcessor`` / ``LlavaNextProcessor`` that expands ``<image>`` into the right number of image tokens.

Also used by ``benchmarks/gpu_check.py`` (``--tiny``), so it imports nothing from the test suite.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
# Vicuna-style prompt in the layout of llava-hf's chat templates: a message's content is a string (lmms-eval's
# simple models) or a list of {"type": "image"} / {"type": "text", "text": ...} parts (its chat models), whose
# images come first as <image> tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}"
    "{% endfor %}{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ part['text'] + ' ' }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is shown in the image? ASSISTANT: The image shows a cat sitting on a table.",
    "Describe the photo in detail. What colour is the car? How many people are there?",
    "The astronaut is wearing a white suit. A coffee cup stands next to the rocket.",
    "Was ist auf dem Bild zu sehen? Wie viele Personen sind dort?",
]
FAMILIES = ("llava", "llava_next")


def train_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer (every string encodes) wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llava_configs(
    family: str,
    *,
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    grid_pinpoints: list[list[int]] | None = None,
) -> Any:
    """The ``LlavaConfig`` / ``LlavaNextConfig`` of a model; ``text`` / ``vision`` override the tiny sizes
    (``benchmarks/gpu_check.py`` passes LLaVA-1.5-7B's)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vcfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )  # fmt: skip
    vcfg.update(vision or {})
    tcfg = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    tcfg.update(text or {})
    # a larger vocabulary than the tokenizer's is allowed (a 7B-shaped lm_head); ids past it decode to nothing
    tcfg.update(vocab_size=max(vocab_size, tcfg.get("vocab_size", 0)))
    tcfg.update(pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    common = dict(
        vision_config=CLIPVisionConfig(**vcfg),
        text_config=LlamaConfig(**tcfg),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=pad_token_id,
    )
    if family == "llava":
        return LlavaConfig(**common)
    if family == "llava_next":
        size = vcfg["image_size"]
        pins = grid_pinpoints or [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        return LlavaNextConfig(**common, image_grid_pinpoints=pins)
    raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")


def build_processor(
    family: str, tokenizer: Any, *, image_size: int, patch_size: int, pins: Any = None
) -> Any:
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    sizes = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if family == "llava":
        ip = CLIPImageProcessor(**sizes)
        cls = LlavaProcessor
    else:
        pins = pins or [
            [image_size, image_size], [image_size, 2 * image_size],
            [2 * image_size, image_size], [2 * image_size, 2 * image_size],
        ]  # fmt: skip
        ip = LlavaNextImageProcessor(**sizes, image_grid_pinpoints=pins)
        cls = LlavaNextProcessor
    return cls(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token ("default" drops it again)
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def save_tiny_llava(
    path: str | Path,
    family: str = "llava",
    *,
    seed: int = 0,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    dtype: Any = None,
    device: str = "cpu",
) -> Path:
    """Build and save a random-weight LLaVA-1.5 (``family="llava"``) or LLaVA-NeXT (``"llava_next"``) in
    ``path``; returns ``path``. A folder already holding a complete save is reused. ``dtype`` / ``device``:
    where the random weights are made (a 7B model is built in bf16 on the GPU)."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    path = Path(path)
    marker = path / "tiny_llava.json"
    if marker.is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = llava_configs(
        family, vocab_size=len(tok), image_token_id=image_id, pad_token_id=tok.pad_token_id,
        text=text, vision=vision,
    )  # fmt: skip
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if family == "llava" else LlavaNextForConditionalGeneration
    old = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval().save_pretrained(path, safe_serialization=True)
    del model
    tok.save_pretrained(path)
    vcfg = cfg.vision_config
    pins = getattr(cfg, "image_grid_pinpoints", None)
    proc = build_processor(family, tok, image_size=vcfg.image_size, patch_size=vcfg.patch_size, pins=pins)
    proc.save_pretrained(path)
    marker.write_text(json.dumps({"family": family, "seed": seed, "image_size": vcfg.image_size}))
    return path


def decord_stub(folder: str | Path) -> Path | None:
    """lmms-eval 0.7.3's ``llava_hf`` module imports ``decord`` (video reading) at import time, and
    lmms-eval does not declare it. Where it is not installed, write a stub package into ``folder`` (to be put
    on ``PYTHONPATH`` / ``sys.path``) whose video reader refuses to run; images never reach it. Returns the
    folder, or None when the real ``decord`` is importable."""
    if importlib.util.find_spec("decord") is not None:
        return None
    pkg = Path(folder) / "decord"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        '"""Stub written by lmms-emi tests: decord is not installed."""\n\n'
        "def cpu(*args, **kwargs):\n    return None\n\n\n"
        "class VideoReader:\n    def __init__(self, *args, **kwargs):\n"
        '        raise RuntimeError("decord is not installed (stub from lmms-emi tests)")\n'
    )
    return Path(folder)


_PROBE = '''"""Written by lmms-emi tests (tests/tiny_llava.py): with $LMMS_EMI_TEST_GENERATE_LOG set,
every call of LlavaForConditionalGeneration.generate / LlavaNextForConditionalGeneration.generate appends one
JSON line: the shapes of the tensors it was given, the new tokens and the seconds it took."""
import os

_LOG = os.environ.get("LMMS_EMI_TEST_GENERATE_LOG")
if _LOG:
    import functools
    import json
    import time

    from transformers.models.llava import modeling_llava
    from transformers.models.llava_next import modeling_llava_next

    def _wrap(cls):
        inner = cls.generate

        @functools.wraps(inner)
        def generate(self, *args, **kwargs):
            pv = kwargs.get("pixel_values")
            ids = kwargs.get("input_ids")
            if pv is not None and pv.is_cuda:
                import torch

                torch.cuda.synchronize()
            started = time.perf_counter()
            out = inner(self, *args, **kwargs)
            if pv is not None and pv.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            row = {
                "class": cls.__name__,
                "pixel_values": None if pv is None else list(pv.shape),
                "pixel_dtype": None if pv is None else str(pv.dtype),
                "pixel_std": None if pv is None else float(pv.float().std()),
                "input_ids": None if ids is None else list(ids.shape),
                "new_tokens": None if ids is None else int(out.shape[-1] - ids.shape[-1]),
                "seconds": seconds,
                "pid": os.getpid(),
            }
            with open(_LOG, "a") as fh:
                fh.write(json.dumps(row) + "\\n")
            return out

        cls.generate = generate

    _wrap(modeling_llava.LlavaForConditionalGeneration)
    _wrap(modeling_llava_next.LlavaNextForConditionalGeneration)
'''


def write_probe(folder: str | Path) -> Path:
    """A folder for the front of a subprocess's ``PYTHONPATH``: a ``sitecustomize`` that logs what each
    LLaVA ``generate`` call receives (see ``_PROBE``) and, where ``decord`` is missing, the stub of
    :func:`decord_stub`. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_PROBE)
    decord_stub(folder)
    return folder
