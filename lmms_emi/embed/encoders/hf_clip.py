"""``hf-clip`` (the default image backend, e.g. ``openai/clip-vit-base-patch32``): a CLIP vision tower
through transformers, feature ``patch_mean``: ``z_v = mean_{i>=1} H[:, i, :]`` with ``H`` the vision
encoder's last hidden state *before* ``post_layernorm`` (= ``CLIPVisionModel(...).last_hidden_state``),
i.e. the mean over the patch tokens, class token excluded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from .base import Encoder, EncoderBatch, EncoderInfo, load_or_explain, make_cache_id, source_fingerprint
from .known import identity, read_json, recorded_name, vision_config
from .registry import register_backend


def describe_hf_clip(source: str, *, name: str | None = None) -> EncoderInfo:
    """:class:`EncoderInfo` of :class:`HFClipVision` from ``config.json`` (and the preprocessor config)."""
    config = read_json(source, "config.json", "CLIP vision model", required=True)
    assert config is not None
    processor = read_json(source, "preprocessor_config.json", "CLIP image processor", required=False)
    recorded, known = identity(source, "hf-clip", name, config, processor=processor)
    dim = int(vision_config(config).get("hidden_size", 768))
    fp = source_fingerprint(source)
    return EncoderInfo(
        "image", "hf-clip", source, recorded, "patch_mean", -1, dim,
        make_cache_id("hf-clip", recorded, fp, "patch_mean", -1), known,
    )  # fmt: skip


@register_backend("hf-clip", describe=describe_hf_clip)
class HFClipVision(Encoder):
    """CLIP vision tower through transformers; feature = mean of the patch tokens of the last
    hidden state (before post_layernorm)."""

    modality = "image"
    backend = "hf-clip"

    def __init__(self, source: str, *, name: str | None = None) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        self.processor = load_or_explain(
            "CLIP image processor", source, lambda: CLIPImageProcessor.from_pretrained(source)
        )
        # Works for both a CLIPVisionModel and a full CLIPModel checkpoint (vision tower extracted).
        self.model = load_or_explain(
            "CLIP vision model", source, lambda: CLIPVisionModel.from_pretrained(source)
        ).eval()
        self.name = recorded_name(source, self.backend, name)
        self.feature = "patch_mean"
        self.layer = -1
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = source_fingerprint(source)

    def prepare(self, items: Sequence[Image.Image]) -> EncoderBatch:
        px = self.processor(images=list(items), return_tensors="pt")["pixel_values"]
        return EncoderBatch({"pixel_values": px})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.model(pixel_values=inputs["pixel_values"]).last_hidden_state  # [B, 1+P, d]
        return h[:, 1:, :].mean(dim=1)

    def to(self, device: torch.device) -> HFClipVision:
        self.model.to(device)
        return self
