"""The embedding cache under faults (issue 9): unusable cache folders, lmms-eval's global warning filter,
what produced a cached vector, each entry bound to its encoder spec (issue 17); the embeddings file's
metadata checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers_embed import save_tiny_clip_vision, save_tiny_xlmr

from lmms_emi.embed import Embedder
from lmms_emi.embed.cache import EmbeddingCache

TEXTS = ["alpha one", "beta two", "gamma three", "delta four"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {"clip": save_tiny_clip_vision(root / "clip"), "xlmr": save_tiny_xlmr(root / "xlmr")}


def _embedder(models: dict[str, Path], cache: Path | bool, **kw: object) -> Embedder:
    return Embedder(
        vision=str(models["clip"]), text=str(models["xlmr"]), cache_dir=cache, progress=False, **kw
    )


def test_a_cache_folder_that_cannot_be_created_falls_back_with_one_warning(models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(
        UserWarning, match=r"embedding cache .*file/cache is not usable .*running without"
    ) as rec:
        e = _embedder(models, blocker / "cache")
        z = e.embed_texts(TEXTS)
    assert e.cache is None and len([w for w in rec if "embedding cache" in str(w.message)]) == 1
    torch.testing.assert_close(z, _embedder(models, False).embed_texts(TEXTS), atol=0, rtol=0)


def test_a_cache_whose_writes_fail_warns_once_and_keeps_the_values(models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    e = _embedder(models, cache)

    def refuse(self, key, vec, **kw):
        raise PermissionError(13, "Permission denied", str(self.path(key)))

    monkeypatch.setattr(EmbeddingCache, "put", refuse)
    with pytest.warns(
        UserWarning, match=r"could not write to the embedding cache .*Permission denied"
    ) as rec:
        z = e.embed_texts(TEXTS)
        e.embed_texts(["one more", "and another"])
    assert len([w for w in rec if "could not write" in str(w.message)]) == 1
    torch.testing.assert_close(z, _embedder(models, False).embed_texts(TEXTS), atol=0, rtol=0)


def test_cache_warnings_survive_lmms_evals_global_ignore_filter(models, tmp_path):
    cache = tmp_path / "cache"
    _embedder(models, cache).embed_texts(TEXTS)
    victim = sorted(cache.rglob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-7])
    e = _embedder(models, cache)
    with pytest.warns(UserWarning, match="1 corrupt or truncated embedding cache entry"):
        warnings.filterwarnings("ignore")  # what importing lmms_eval.utils does to every process
        e.embed_texts(TEXTS)
    assert e.stats.text.corrupt_entries == 1


def test_a_cache_entry_records_what_produced_it(models, tmp_path):
    cache = tmp_path / "cache"
    _embedder(models, cache, batch_size=3).embed_texts(TEXTS)
    from safetensors import safe_open

    entry = sorted(cache.rglob("*.safetensors"))[0]
    with safe_open(str(entry), framework="pt") as fh:
        produced = json.loads(fh.metadata()["produced_by"])
    assert produced["batch_size"] == 3 and produced["device"] == "cpu"
    assert set(produced) >= {"batch_size", "device", "torch"}


# --- each entry bound to its encoder spec (issue 17) -------------------------------------------------------
def _only_entry(cache: Path) -> Path:
    (entry,) = cache.rglob("*.safetensors")
    return entry


def _entry(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}


def _place(src: Path, dst: Path, **meta: str | None) -> None:
    """``src``'s entry written at ``dst``, its metadata changed (None: removed), vector bytes unchanged."""
    from safetensors.torch import save_file

    metadata, tensors = _entry(src)
    metadata = {k: v for k, v in {**metadata, **meta}.items() if v is not None}
    save_file(tensors, str(dst), metadata=metadata)


def test_a_cache_entry_records_the_spec_of_its_encoder(models, tmp_path):
    from lmms_emi.embed.cache import CacheKey, cache_key, spec_hash

    _embedder(models, tmp_path / "c").embed_texts(TEXTS[:1])
    metadata, _ = _entry(_only_entry(tmp_path / "c"))
    assert len(metadata["spec"]) == 64
    key = cache_key("enc", 0, "", "content")
    assert isinstance(key, CacheKey) and key.spec == spec_hash("enc", 0, "") and key == str(key)
    assert {key: 1}[str(key)] == 1  # hashes and compares as the plain key


def test_an_entry_moved_from_another_encoder_is_a_miss_with_one_warning(models, tmp_path):
    """An entry of the layer-0 encoder placed at a layer-1 key (its key field edited to match, its checksum
    still valid) is recomputed, with one warning, and the values are bit-identical to a run without cache."""
    layer0, layer1 = tmp_path / "layer0", tmp_path / "layer1"
    _embedder(models, layer0, text_layer=0).embed_texts(TEXTS[:1])
    _embedder(models, layer1, text_layer=1).embed_texts(TEXTS[:1])
    target = _only_entry(layer1)
    own = _entry(target)[0]["spec"]
    assert _entry(_only_entry(layer0))[0]["spec"] != own
    _place(_only_entry(layer0), target, key=target.stem)
    e = _embedder(models, layer1, text_layer=1)
    with pytest.warns(UserWarning, match=r"1 embedding cache entry under .* recorded another encoder") as rec:
        z = e.embed_texts(TEXTS[:1])
    assert len([w for w in rec if "another encoder" in str(w.message)]) == 1
    assert e.stats.text.cache_hits == 0 and e.stats.text.corrupt_entries == 0
    fresh = _embedder(models, False, text_layer=1).embed_texts(TEXTS[:1])
    torch.testing.assert_close(z, fresh, atol=0, rtol=0)
    assert _entry(target)[0]["spec"] == own  # overwritten with its own entry
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # now a clean hit
        again = _embedder(models, layer1, text_layer=1)
        torch.testing.assert_close(again.embed_texts(TEXTS[:1]), fresh, atol=0, rtol=0)
    assert again.stats.text.cache_hits == 1


def test_entries_written_before_the_binding_are_still_served(models, tmp_path):
    """Backward compatible: an entry without ``spec`` is served as before (which is also why a deliberate
    rewrite cannot be detected without recomputing: docs/CACHE.md)."""
    cache = tmp_path / "cache"
    first = _embedder(models, cache).embed_texts(TEXTS)
    for entry in cache.rglob("*.safetensors"):
        _place(entry, entry, spec=None)
        assert "spec" not in _entry(entry)[0]
    e = _embedder(models, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(e.embed_texts(TEXTS), first, atol=0, rtol=0)
    assert e.stats.text.cache_hits == len(TEXTS) and e.stats.text.cache_misses == 0


# --- the embeddings file ----------------------------------------------------------------------------------
def _tasks(n: int = 6, d: int = 8, seed: int = 0) -> dict:
    from lmms_emi.emi import TaskEmbeddings

    g = torch.Generator().manual_seed(seed)
    return {
        name: TaskEmbeddings(
            *(torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) for _ in "vtmr")
        )
        for name in ("task_a", "task_b")
    }


def _rewrite(src: Path, dst: Path, *, tensors=None, **meta: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        metadata = {**fh.metadata(), **meta}
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors if tensors is not None else state, str(dst), metadata=metadata)


@pytest.mark.parametrize(
    ("meta", "tensors", "message"),
    [
        ({"tasks": "{oops"}, None, r"metadata 'tasks' is not valid JSON"),
        ({"tasks": '{"a": 1}'}, None, r"metadata 'tasks' must be a list of task names"),
        ({"encoders": "[1]"}, None, r"metadata 'encoders' must be a JSON object"),
        ({"tasks": '["task_a", "task_c"]'}, None, r"task 'task_c' has no z_v / z_t"),
        ({}, "short_rows", r"task 'task_b': z_model has 5 rows but z_v has 6"),
        ({}, "other_dim", r"task 'task_b': z_v has dim 4 but task 'task_a' has 8"),
    ],
)
def test_a_malformed_embeddings_file_is_one_error_naming_it(tmp_path, meta, tensors, message):
    from lmms_emi.embed.store import load_embeddings, save_embeddings

    good = save_embeddings(_tasks(), tmp_path / "good.safetensors", encoders={"vision": {"name": "v"}})
    state = None
    if tensors is not None:
        from safetensors.torch import load_file

        state = load_file(str(good))
        if tensors == "short_rows":
            state["task_b/z_model"] = state["task_b/z_model"][:5].clone()
        else:
            for f in ("z_v", "z_t", "z_model", "z_ref"):
                state[f"task_b/{f}"] = state[f"task_b/{f}"][:, :4].clone()
    bad = tmp_path / "bad.safetensors"
    _rewrite(good, bad, tensors=state, **meta)
    with pytest.raises(ValueError, match=message) as info:
        load_embeddings(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fine\ud800text", r"text of sample 'task_x doc_id=4 \(response\)' \(index 1\) is not valid Unicode"),
        (b"caf\xe9", r"text of sample 'task_x doc_id=4 \(response\)' \(index 1\) is not UTF-8 \(byte 0xe9"),
    ],
)
def test_undecodable_texts_name_the_sample(models, text, message):
    from lmms_emi.errors import EmbedInputError

    e = _embedder(models, False)
    with pytest.raises(EmbedInputError, match=message):
        e.embed_texts(["ok", text], sample_ids=["task_x doc_id=3 (question)", "task_x doc_id=4 (response)"])


def test_undecodable_sample_text_is_named_through_the_pipeline(models):
    from PIL import Image

    from lmms_emi.errors import EmbedInputError
    from lmms_emi.pipeline.records import Sample, embed_tasks

    rows = [
        Sample("task_x", i, Image.new("RGB", (8, 8)), "q", "a\udc80" if i == 2 else "fine") for i in range(3)
    ]
    with pytest.raises(EmbedInputError, match=r"sample 'task_x doc_id=2 \(response\)'"):
        embed_tasks(_embedder(models, False), {"task_x": rows})


def test_an_image_pil_refuses_as_a_bomb_quotes_the_plugins_limit(monkeypatch):
    """PIL refuses to open an image over twice its own pixel limit; the one line quotes the plugin's limit
    (64 M pixels), not PIL's, and names the sample."""
    import io

    from PIL import Image

    from lmms_emi.embed.inputs import ImageItem
    from lmms_emi.errors import EmbedInputError

    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels > 2 x 100: PIL's bomb error
    item = ImageItem("h", "sample 'q7' (index 3)", data=buf.getvalue())
    with pytest.raises(EmbedInputError) as err:
        item.load_rgb()
    message = str(err.value)
    assert "sample 'q7' (index 3)" in message and "64,000,000 pixels" in message
    assert "178" not in message and "\n" not in message
