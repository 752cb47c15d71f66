"""Offline tests of lmms_emi.embed with tiny random-weight CLIP-vision / XLM-R models.

The models are built from configs, saved with ``save_pretrained`` and loaded back by path through
the package's real loading code (see tests/helpers_embed.py).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_embed import photos, png_bytes, save_tiny_clip_full, save_tiny_clip_vision, save_tiny_xlmr
from PIL import Image, ImageFilter

from lmms_emi.embed import (
    Embedder,
    EmbedInputError,
    RandomProjection,
    mean_after_first,
    profile_spec,
)
from lmms_emi.embed.cache import EmbeddingCache

TEXTS = [
    "What is the color of the car on the left?",
    "A dog runs in the park",
    "Describe the image in detail.",
    "two",
    "The man is holding a red cup of coffee while standing on the street.",
    "",
]


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "clip": save_tiny_clip_vision(root / "clip"),
        "clip48": save_tiny_clip_vision(root / "clip48", hidden=48, seed=3),
        "clip_full": save_tiny_clip_full(root / "clip_full"),
        "xlmr": save_tiny_xlmr(root / "xlmr"),
    }


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [Image.fromarray(a) for a in photos().values()]  # camera is mode "L"


@pytest.fixture(scope="session")
def emb(models: dict[str, Path]) -> Embedder:
    """Shared embedder without disk cache (pure computation)."""
    return Embedder(vision=str(models["clip"]), text=str(models["xlmr"]), cache_dir=False, progress=False)


def _embedder(models: dict[str, Path], cache: Path | bool = False, **kw: object) -> Embedder:
    kw.setdefault("progress", False)
    return Embedder(vision=str(models["clip"]), text=str(models["xlmr"]), cache_dir=cache, **kw)  # type: ignore[arg-type]


def _unit_rows(z: torch.Tensor) -> None:
    assert z.dtype == torch.float32
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.norm(dim=1), torch.ones(z.shape[0]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- images
def test_image_features_shape_norm_and_definition(
    emb: Embedder, images: list[Image.Image], models: dict
) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    z = emb.embed_images(images)
    assert z.shape == (5, 32) and not z.is_inference()
    _unit_rows(z)
    # Independent computation of the definition: mean of patch tokens of hidden_states[-1] (pre post-LN).
    model = CLIPVisionModel.from_pretrained(models["clip"]).eval()
    proc = CLIPImageProcessor.from_pretrained(models["clip"])
    px = proc(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=px, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)
    ref = F.normalize(out.hidden_states[-1][:, 1:, :].mean(1), dim=-1)
    torch.testing.assert_close(z, ref, atol=1e-6, rtol=0)
    # distinct photos give distinct features
    sims = z @ z.T
    assert (sims - torch.eye(5)).abs().max() < 1 - 1e-4


def test_vision_tower_of_full_clip_checkpoint(models: dict, images: list[Image.Image]) -> None:
    from transformers import CLIPImageProcessor, CLIPModel

    e = Embedder(
        vision=f"hf-clip:{models['clip_full']}", text=str(models["xlmr"]), cache_dir=False, progress=False
    )
    z = e.embed_images(images[:3])
    full = CLIPModel.from_pretrained(models["clip_full"]).eval()
    px = CLIPImageProcessor.from_pretrained(models["clip_full"])(images=images[:3], return_tensors="pt")
    with torch.no_grad():
        h = full.vision_model(pixel_values=px["pixel_values"]).last_hidden_state
    torch.testing.assert_close(z, F.normalize(h[:, 1:].mean(1), dim=-1), atol=1e-6, rtol=0)


def test_image_input_kinds_agree(emb: Embedder, images: list[Image.Image], tmp_path: Path) -> None:
    im = images[1]  # chelsea
    path = tmp_path / "chelsea.png"
    im.save(path)
    arr = np.asarray(im)
    z = emb.embed_images([im, png_bytes(im), path, str(path), arr, {"bytes": png_bytes(im), "path": None}])
    torch.testing.assert_close(z, z[:1].expand(6, -1), atol=1e-6, rtol=0)


def test_image_modes_converted(emb: Embedder, images: list[Image.Image]) -> None:
    rgb = images[0].resize((64, 64))
    opaque = rgb.convert("RGBA")
    transparent = rgb.convert("RGBA")
    transparent.putalpha(0)  # fully transparent -> white
    white = Image.new("RGB", rgb.size, (255, 255, 255))
    grey = rgb.convert("L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert grey16.mode == "I;16"
    z = emb.embed_images([rgb, opaque, transparent, white, grey, grey.convert("RGB"), palette, grey16])
    _unit_rows(z)
    torch.testing.assert_close(z[1], z[0], atol=1e-6, rtol=0)  # opaque alpha is dropped
    torch.testing.assert_close(z[2], z[3], atol=1e-6, rtol=0)  # transparent composited onto white
    torch.testing.assert_close(z[4], z[5], atol=1e-6, rtol=0)  # L -> replicated RGB
    torch.testing.assert_close(z[7], z[5], atol=1e-6, rtol=0)  # 16-bit rescaled to the same 8-bit image
    assert float(z[6] @ z[0]) > 0.9  # 64-colour palette ~ original


def test_missing_or_unreadable_image_names_sample(
    emb: Embedder, images: list[Image.Image], tmp_path: Path
) -> None:
    ok = images[0]
    with pytest.raises(EmbedInputError, match=r"'q-17'.*missing"):
        emb.embed_images([ok, None], sample_ids=["q-16", "q-17"])
    with pytest.raises(EmbedInputError, match=r"index 1.*nope\.png"):
        emb.embed_images([ok, tmp_path / "nope.png"])
    with pytest.raises(EmbedInputError, match=r"'bad'.*could not be decoded"):
        emb.embed_images([ok, b"definitely not an image"], sample_ids=["good", "bad"])
    with pytest.raises(EmbedInputError, match=r"unsupported type"):
        emb.embed_images([3.5])
    with pytest.raises(TypeError, match="sequence"):
        emb.embed_images(ok)
    with pytest.raises(TypeError, match="sequence"):
        emb.embed_texts("a lone string")


# ---------------------------------------------------------------------------------------- texts
def test_layer0_shortcut_equals_full_forward_hidden_state0(models: dict) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["xlmr"])
    model = AutoModel.from_pretrained(models["xlmr"]).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert (enc["input_ids"] == tok.pad_token_id).any()  # padding present: position ids must skip it
    with torch.no_grad():
        full = model(**enc, output_hidden_states=True).hidden_states
        short = model.embeddings(input_ids=enc["input_ids"])
    torch.testing.assert_close(short, full[0], atol=1e-6, rtol=0)

    # and the embedder's layer-0 features equal the pooled full-forward hidden_states[0]
    z = Embedder(
        vision=str(models["clip"]), text=str(models["xlmr"]), cache_dir=False, progress=False
    ).embed_texts(TEXTS)
    ref = F.normalize(mean_after_first(full[0], enc["attention_mask"]), dim=-1)
    torch.testing.assert_close(z, ref, atol=1e-6, rtol=0)
    # deeper layer through the full model
    z2 = _embedder(models, text_layer=2).embed_texts(TEXTS)
    torch.testing.assert_close(
        z2, F.normalize(mean_after_first(full[2], enc["attention_mask"]), dim=-1), atol=1e-6, rtol=0
    )


def test_text_feature_is_mean_after_first_token(models: dict, emb: Embedder) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["xlmr"])
    model = AutoModel.from_pretrained(models["xlmr"]).eval()
    text = "A dog runs in the park"
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"][0, 0] == 0 and ids["input_ids"][0, -1] == 2  # <s> ... </s>
    with torch.no_grad():
        h = model(**ids, output_hidden_states=True).hidden_states[0][0]
    expected = F.normalize(h[1:].mean(0), dim=0)  # tokens after <s>, </s> included
    torch.testing.assert_close(emb.embed_texts([text])[0], expected, atol=1e-6, rtol=0)


def test_mean_after_first_guards() -> None:
    h = torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    z = mean_after_first(h, mask)
    torch.testing.assert_close(z[0], h[0, 1:3].mean(0))
    torch.testing.assert_close(z[1], h[1, 0])  # only the first token: fall back to it, no NaN
    torch.testing.assert_close(z[2], h[2, 1:].mean(0))


def test_text_layer_resolution(models: dict) -> None:
    e = _embedder(models, text_layer=-1)
    assert e.text.layer == 2 and e.encoder_spec()["text"]["layer"] == 2
    with pytest.raises(ValueError, match="out of range"):
        _embedder(models, text_layer=3)


def test_empty_and_nonstring_responses(emb: Embedder) -> None:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        e = Embedder(vision=emb.vision, text=emb.text, cache_dir=False, progress=False)
        z = e.embed_texts([None, 3, ["a", "b"], "", 2.5], what="response")
        e.embed_texts([None], what="response")  # second call: no second warning
    conv = [w for w in rec if "non-string response" in str(w.message)]
    assert len(conv) == 1 and "4 non-string" in str(conv[0].message)
    assert z.shape == (5, 32)
    _unit_rows(z)
    ref = emb.embed_texts(["", "3", "['a', 'b']", "", "2.5"])
    torch.testing.assert_close(z, ref, atol=0, rtol=0)


def test_long_text_truncated_with_one_warning(models: dict) -> None:
    e = _embedder(models)
    long_a, long_b = "dog " * 200, "dog " * 300 + "cat"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        z = e.embed_texts([long_a, "short text", long_b])
        e.embed_texts(["park " * 100])
    trunc = [w for w in rec if "truncated" in str(w.message)]
    assert len(trunc) == 1 and "64 tokens" in str(trunc[0].message)
    assert e.stats.text.truncated == 3
    # both long texts are cut to the same first 64 tokens -> identical features
    torch.testing.assert_close(z[0], z[2], atol=1e-6, rtol=0)
    _unit_rows(z)


def test_determinism_and_batch_size_invariance(models: dict, images: list[Image.Image]) -> None:
    a = _embedder(models, batch_size=1, num_workers=0)
    b = _embedder(models, batch_size=4, num_workers=2)
    za, zb = a.embed_texts(TEXTS), b.embed_texts(TEXTS)
    torch.testing.assert_close(za, zb, atol=1e-6, rtol=0)
    ia, ib = a.embed_images(images), b.embed_images(images)
    torch.testing.assert_close(ia, ib, atol=1e-6, rtol=0)
    assert a.stats.image.forward_passes == 5 and b.stats.image.forward_passes == 2
    torch.testing.assert_close(b.embed_texts(TEXTS), zb, atol=0, rtol=0)  # same embedder, same batches: exact


def test_parallel_preprocessing_matches_inline(models: dict) -> None:
    """Tokenisation runs in worker threads (one shared fast tokenizer): many small batches of texts
    with very different lengths must give exactly what inline preprocessing gives."""
    rng = np.random.default_rng(0)
    words = "dog cat park red blue the a of runs sitting".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + f" {i}" for i in range(60)]
    inline = _embedder(models, batch_size=3, num_workers=0).embed_texts(texts)
    threaded = _embedder(models, batch_size=3, num_workers=3).embed_texts(texts)
    torch.testing.assert_close(threaded, inline, atol=0, rtol=0)


def test_dedup_within_call(models: dict, images: list[Image.Image]) -> None:
    e = _embedder(models)
    z = e.embed_texts(["x", "y", "x", "x", "y", "z"])
    assert (e.stats.text.requested, e.stats.text.unique, e.stats.text.encoder_calls) == (6, 3, 3)
    assert e.stats.text.saved == 3
    torch.testing.assert_close(z[0], z[2], atol=0, rtol=0)
    e.embed_images([images[0], images[1], images[0]])
    assert e.stats.image.encoder_calls == 2 and e.stats.saved == 4
    assert "total: 9 requested, 5 encoded, 4 encoder calls saved" in e.stats.summary()


# ---------------------------------------------------------------------------------------- cache
def test_cache_hits_and_misses_exact(models: dict, images: list[Image.Image], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    e1 = _embedder(models, cache)
    z_img = e1.embed_images(images + images[:2])
    z_txt = e1.embed_texts([*TEXTS, TEXTS[0]])
    s = e1.stats
    assert (s.image.cache_hits, s.image.cache_misses, s.image.encoder_calls) == (0, 5, 5)
    assert (s.text.cache_hits, s.text.cache_misses, s.text.encoder_calls) == (0, 6, 6)
    assert len(list(cache.rglob("*.safetensors"))) == 11
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave no temp files

    e2 = _embedder(models, cache)  # a new run: everything from disk
    torch.testing.assert_close(e2.embed_images(images + images[:2]), z_img, atol=0, rtol=0)
    torch.testing.assert_close(e2.embed_texts([*TEXTS, TEXTS[0]]), z_txt, atol=0, rtol=0)
    s = e2.stats
    assert (s.image.cache_hits, s.image.cache_misses, s.image.encoder_calls) == (5, 0, 0)
    assert (s.text.cache_hits, s.text.cache_misses, s.text.encoder_calls) == (6, 0, 0)
    assert s.saved == 7 + 7

    # another text layer or encoder must not share entries
    e3 = _embedder(models, cache, text_layer=1)
    e3.embed_texts(TEXTS)
    assert e3.stats.text.cache_hits == 0 and e3.stats.text.cache_misses == 6


def test_corrupt_cache_entries_are_recomputed(models: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    texts = ["alpha one", "beta two", "gamma three", "delta four"]
    ref = _embedder(models, cache).embed_texts(texts)
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 4
    raw = [f.read_bytes() for f in files]
    files[0].write_bytes(raw[0][: len(raw[0]) // 2])  # truncated
    flipped = bytearray(raw[1])
    flipped[-3] ^= 0x40  # one bit in the vector payload
    files[1].write_bytes(bytes(flipped))
    files[2].write_bytes(b"")  # empty
    e = _embedder(models, cache)
    with pytest.warns(UserWarning, match="3 corrupt or truncated embedding cache entries"):
        z = e.embed_texts(texts)
    torch.testing.assert_close(z, ref, atol=1e-6, rtol=0)
    assert (e.stats.text.corrupt_entries, e.stats.text.cache_hits, e.stats.text.encoder_calls) == (3, 1, 3)
    # entries were rewritten: a third run is all hits
    e3 = _embedder(models, cache)
    torch.testing.assert_close(e3.embed_texts(texts), z, atol=0, rtol=0)
    assert e3.stats.text.cache_hits == 4 and e3.stats.text.corrupt_entries == 0


def test_cache_entry_format(tmp_path: Path) -> None:
    c = EmbeddingCache(tmp_path)
    v = F.normalize(torch.randn(7), dim=0)
    c.put("ab" * 32, v)
    got, corrupt = c.get("ab" * 32, 7)
    assert not corrupt and torch.equal(got, v)
    assert c.get("ab" * 32, 8) == (None, True)  # wrong dim is never returned
    assert c.get("cd" * 32, 7) == (None, False)  # plain miss
    # an entry copied under another key is rejected (key recorded inside the file)
    other = c.path("ef" * 32)
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(c.path("ab" * 32).read_bytes())
    assert c.get("ef" * 32, 7) == (None, True)


# ---------------------------------------------------------------------------------------- specs, projection
def test_encoder_spec_has_paper_shape(models: dict) -> None:
    from lmms_emi.encoder_spec import PAPER_ENCODERS

    assert profile_spec("paper") == PAPER_ENCODERS
    e = _embedder(models, vision_name="openai/clip-vit-base-patch32", text_name="xlm-roberta-base")
    spec = e.encoder_spec()
    json.dumps(spec)
    expect = json.loads(json.dumps(PAPER_ENCODERS))
    expect["vision"]["dim"] = expect["text"]["dim"] = 32
    assert spec == expect  # same keys and values, only the (tiny) dims differ


def test_projection_when_dims_differ(models: dict, images: list[Image.Image]) -> None:
    e = Embedder(vision=str(models["clip48"]), text=str(models["xlmr"]), cache_dir=False, progress=False)
    spec = e.encoder_spec()
    assert spec["projection"] == {
        "kind": "gaussian",
        "seed": 0,
        "modality": "vision",
        "in_dim": 48,
        "out_dim": 32,
    }
    assert spec["vision"]["dim"] == spec["text"]["dim"] == e.dim == 32
    zv, zt = e.embed_images(images), e.embed_texts(TEXTS)
    assert zv.shape == (5, 32) and zt.shape == (6, 32)
    _unit_rows(zv)
    # the projection is the documented seeded Gaussian matrix G / sqrt(k)
    g = np.random.default_rng(0).standard_normal((48, 32)) / np.sqrt(32)
    torch.testing.assert_close(
        RandomProjection("vision", 48, 32, 0).matrix(), torch.from_numpy(g.astype(np.float32))
    )
    again = Embedder(
        vision=str(models["clip48"]),
        text=str(models["xlmr"]),
        cache_dir=False,
        progress=False,
        projection_seed=0,
    )
    torch.testing.assert_close(again.embed_images(images), zv, atol=0, rtol=0)  # same seed -> same features
    other = Embedder(
        vision=str(models["clip48"]),
        text=str(models["xlmr"]),
        cache_dir=False,
        progress=False,
        projection_seed=7,
    )
    assert other.encoder_spec()["projection"]["seed"] == 7
    assert not torch.allclose(other.embed_images(images), zv)


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        Embedder.from_profile("nope")


# ---------------------------------------------------------------------------------------- embed_task
def test_embed_task(models: dict, images: list[Image.Image]) -> None:
    from lmms_emi.emi import TaskEmbeddings

    e = _embedder(models)
    qs = ["What is this?", "What animal is this?", "What is in the cup?", "What is this?", "Who took it?"]
    responses = ["A person in space.", "A cat.", None, "A rocket.", "A cat."]
    refs = ["An astronaut.", "A cat.", "Coffee.", "A rocket on a launch pad.", "A photographer."]
    with pytest.warns(UserWarning, match="non-string response"):
        task = e.embed_task(images, qs, responses, refs, sample_ids=list("abcde"))
    assert isinstance(task, TaskEmbeddings)
    z_v, z_t, z_model, z_ref = task
    for z in (z_v, z_t, z_model, z_ref):
        assert z is not None and z.shape == (5, 32)
        _unit_rows(z)
    torch.testing.assert_close(z_model[1], z_ref[1], atol=0, rtol=0)  # identical strings across roles
    torch.testing.assert_close(z_t[0], z_t[3], atol=0, rtol=0)
    # 15 texts requested, 13 unique ("What is this?" x2, "A cat." x3 -> one each)
    assert (e.stats.text.requested, e.stats.text.encoder_calls) == (15, 12)
    torch.testing.assert_close(z_model[2], e.embed_texts([""])[0], atol=0, rtol=0)

    no_ref = e.embed_task(images, qs, responses)
    assert no_ref.z_ref is None and no_ref.z_model is not None
    torch.testing.assert_close(no_ref.z_v, z_v, atol=0, rtol=0)
    empty = e.embed_task([], [], [], [])
    assert empty.z_v.shape == empty.z_ref.shape == (0, 32)
    with pytest.raises(ValueError, match="5 images but 4 questions"):
        e.embed_task(images, qs[:4], responses)
    with pytest.raises(EmbedInputError, match="'c'"):
        e.embed_task([*images[:2], None, *images[3:]], qs, responses, sample_ids=list("abcde"))


# ---------------------------------------------------------------------------------------- open_clip backend
@pytest.mark.slow  # importing open_clip alone takes ~10 s here
def test_open_clip_backend_patch_mean(models: dict, images: list[Image.Image]) -> None:
    pytest.importorskip("open_clip")
    e = Embedder(
        vision="open_clip:ViT-B-32",
        text=str(models["xlmr"]),
        cache_dir=False,
        progress=False,
        projection_seed=0,
    )
    assert e.vision.dim == 768 and e.encoder_spec()["vision"]["name"] == "open_clip:ViT-B-32"
    assert e.encoder_spec()["projection"]["in_dim"] == 768
    # raw feature = mean over patch tokens of the last block output (before ln_post)
    px = e.vision.prepare(images[:2]).inputs["pixel_values"]
    with torch.no_grad():
        raw = e.vision.forward({"pixel_values": px})
        inter = e.vision.visual.forward_intermediates(
            px, indices=1, output_fmt="NLC", intermediates_only=True
        )
    torch.testing.assert_close(raw, inter["image_intermediates"][-1].mean(1), atol=1e-5, rtol=1e-5)
    z = e.embed_images(images[:2])
    proj = RandomProjection("vision", 768, 32, 0).matrix()  # the spec's projection: 768 -> 32, seed 0
    torch.testing.assert_close(z, F.normalize(raw @ proj, dim=-1), atol=1e-5, rtol=0)
    _unit_rows(z)


def test_blur_keeps_random_model_features_close(emb: Embedder, images: list[Image.Image]) -> None:
    """Sanity on real photos: a lightly blurred image stays closer to its original than other photos."""
    cat = images[1]
    z = emb.embed_images([cat, cat.filter(ImageFilter.GaussianBlur(1)), images[2], images[3]])
    assert float(z[0] @ z[1]) > max(float(z[0] @ z[2]), float(z[0] @ z[3]))


# ---------------------------------------------------------------------------------------- manifest round trip
def test_spec_in_checkpoint_manifest_guards_encoders(models: dict, tmp_path: Path) -> None:
    """The spec goes into a CLUB checkpoint manifest; loading it with other encoders/layers fails."""
    from lmms_emi.estimators.club import CLUB, EncoderMismatchError

    e0 = _embedder(models)
    club = CLUB(x_dim=e0.dim, y_dim=e0.dim, hidden_size=8)
    path = club.save(tmp_path / "club.safetensors", club.make_manifest(e0.encoder_spec()))
    assert CLUB.from_checkpoint(path, encoders=e0.encoder_spec()).manifest_.encoders == e0.encoder_spec()
    with pytest.raises(EncoderMismatchError, match=r"text\.layer"):
        CLUB.from_checkpoint(path, encoders=_embedder(models, text_layer=2).encoder_spec())
    # the paper's plain state dict (no manifest) refuses non-paper encoders
    torch.save(club.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(EncoderMismatchError, match="paper"):
        CLUB.from_checkpoint(tmp_path / "plain.pt", encoders=e0.encoder_spec())
