"""Embedding stage of lmms-emi: images / questions / responses / references -> L2-normalised features.

Public API::

    from lmms_emi.embed import Embedder
    emb = Embedder.from_profile("paper")          # CLIP ViT-B/32 patch mean + XLM-R-base layer 0
    emb = Embedder.from_profile("offline")        # EfficientNet-Lite0 + all-MiniLM-L6-v2 (ship in wheels)
    task = emb.embed_task(images, questions, responses, references)   # -> lmms_emi.emi.TaskEmbeddings
    emb.encoder_spec(); print(emb.stats.summary())
"""

from lmms_emi.errors import EmbedInputError, EncoderLoadError

from .cache import EmbeddingCache, cache_key, default_cache_dir
from .distributed import dist_context, gather_rows, shard_and_gather, shard_indices
from .embedder import (
    DEFAULT_PROJECTION_SEED,
    PROFILES,
    Embedder,
    EmbedStats,
    ModalityStats,
    RandomProjection,
    profile_spec,
)
from .encoders import (
    TEXT_ENCODERS,
    VISION_ENCODERS,
    EfficientNetLite0,
    Encoder,
    HFClipVision,
    HFText,
    OpenClipVision,
    load_encoder,
    mean_after_first,
    register_encoder,
)

__all__ = [
    "DEFAULT_PROJECTION_SEED",
    "PROFILES",
    "TEXT_ENCODERS",
    "VISION_ENCODERS",
    "EfficientNetLite0",
    "EmbedInputError",
    "EmbedStats",
    "Embedder",
    "EmbeddingCache",
    "Encoder",
    "EncoderLoadError",
    "HFClipVision",
    "HFText",
    "ModalityStats",
    "OpenClipVision",
    "RandomProjection",
    "cache_key",
    "default_cache_dir",
    "dist_context",
    "gather_rows",
    "load_encoder",
    "mean_after_first",
    "profile_spec",
    "register_encoder",
    "shard_and_gather",
    "shard_indices",
]
