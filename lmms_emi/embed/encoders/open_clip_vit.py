"""``open_clip:<arch>[:<pretrained tag or checkpoint path>]``: the ``patch_mean`` feature (as ``hf-clip``)
taken from an open_clip ViT's transformer output, captured before ``ln_post``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from .base import Encoder, EncoderBatch, EncoderInfo, file_fingerprint, load_or_explain, make_cache_id
from .registry import register_backend


def _weights_fingerprint(pretrained: str) -> str:
    fp = pretrained or "random-init"
    return f"file:{file_fingerprint(fp)}" if os.path.isfile(fp) else f"tag:{fp}"


def describe_open_clip(source: str, *, name: str | None = None) -> EncoderInfo | None:
    """:class:`EncoderInfo` of :class:`OpenClipVision` from open_clip's model config (None when the
    architecture's config is not built into open_clip or its tower is not a ViT)."""
    import open_clip

    arch, _, pretrained = source.partition(":")
    cfg = open_clip.get_model_config(arch) if arch else None
    vision = (cfg or {}).get("vision_cfg") or {}
    if not isinstance(vision.get("width"), int) or vision.get("timm_model_name"):
        return None
    recorded = name or f"open_clip:{source}"
    return EncoderInfo(
        "image", "open_clip", source, recorded, "patch_mean", -1, int(vision["width"]),
        make_cache_id("open_clip", recorded, _weights_fingerprint(pretrained), "patch_mean", -1),
    )  # fmt: skip


@register_backend("open_clip", describe=describe_open_clip)
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
        model, _, preprocess = load_or_explain(
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
        self.fingerprint = _weights_fingerprint(pretrained)
        self._tokens: list[torch.Tensor] = []
        visual.transformer.register_forward_hook(lambda _m, _i, out: self._tokens.append(out))

    def prepare(self, items: Sequence[Image.Image]) -> EncoderBatch:
        return EncoderBatch({"pixel_values": torch.stack([self.transform(im) for im in items])})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._tokens.clear()
        self.visual(inputs["pixel_values"])
        h = self._tokens.pop()  # [B, 1+P, d], batch-first in open_clip >= 2.24
        return h[:, 1:, :].mean(dim=1)

    def to(self, device: torch.device) -> OpenClipVision:
        self.visual.to(device)
        return self
