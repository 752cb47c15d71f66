"""The embedding cache under faults (issue 9): unusable cache folders, lmms-eval's global warning filter,
what produced a cached vector; the embeddings file's metadata checks."""

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
