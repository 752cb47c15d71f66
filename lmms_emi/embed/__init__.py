"""Embedding stage of lmms-emi: images / questions / responses / references -> L2-normalised features.

Public API::

    from lmms_emi.embed import Embedder
    emb = Embedder.from_profile("paper")          # CLIP ViT-B/32 patch mean + XLM-R-base layer 0
    emb = Embedder.from_profile("offline")        # EfficientNet-Lite0 + all-MiniLM-L6-v2 (ship in wheels)
    emb = Embedder(vision="path/to/clip", text="path/to/xlmr")   # local copies: recorded as the paper's
    emb.encoder_spec()                            # from the configs: no model loaded yet
    task = emb.embed_task(images, questions, responses, references)   # -> lmms_emi.emi.TaskEmbeddings
    print(emb.stats.summary())                    # models are loaded only if something missed the cache

``profile_spec(profile, **overrides)`` gives the spec of ``Embedder.from_profile(profile, **overrides)``
without building it (nothing loaded).
"""

from lmms_emi.errors import EmbedInputError, EncoderLoadError

from .cache import EmbeddingCache, cache_key, default_cache_dir
from .embedder import Embedder
from .encoders import (
    KNOWN_ENCODERS,
    TEXT_ENCODERS,
    VISION_ENCODERS,
    EfficientNetLite0,
    Encoder,
    EncoderInfo,
    HFClipVision,
    HFText,
    KnownEncoder,
    OpenClipVision,
    canonical_name,
    describe_encoder,
    load_encoder,
    mean_after_first,
    recognise,
    register_backend,
    register_encoder,
)
from .profiles import PROFILES, SPEC_ARGUMENTS, profile_spec
from .projection import DEFAULT_PROJECTION_SEED, RandomProjection
from .stats import EmbedStats, ModalityStats

__all__ = [
    "DEFAULT_PROJECTION_SEED",
    "KNOWN_ENCODERS",
    "PROFILES",
    "SPEC_ARGUMENTS",
    "TEXT_ENCODERS",
    "VISION_ENCODERS",
    "EfficientNetLite0",
    "EmbedInputError",
    "EmbedStats",
    "Embedder",
    "EmbeddingCache",
    "Encoder",
    "EncoderInfo",
    "EncoderLoadError",
    "HFClipVision",
    "HFText",
    "KnownEncoder",
    "ModalityStats",
    "OpenClipVision",
    "RandomProjection",
    "cache_key",
    "canonical_name",
    "default_cache_dir",
    "describe_encoder",
    "load_encoder",
    "mean_after_first",
    "profile_spec",
    "recognise",
    "register_backend",
    "register_encoder",
]
